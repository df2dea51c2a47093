"""Published RoPE configs, as small config.json dicts, for the conformance checks.

CONFIGS is a list of (name, config dict, source). Each dict holds the keys of the published
config.json that decide the RoPE (model_type, the head shape, max_position_embeddings,
rope_theta, rope_scaling, and top-level original_max_position_embeddings where the file has it),
copied from the published file; the weights' other shape keys are left out. `source` is the
file's address, or "written from the model card" where the values come from a model card's
instructions rather than a config.json.

Used by tests/test_conformance.py (this project's `rope --config --json` against transformers'
own RoPE init) and by the conformance experiment (experiments/), which builds tiny models from
the same dicts.

Values checked against a copy of the published file found with the search tools are marked
"checked"; the others are written from the published files as recalled and are marked
"not checked here" (every such value agrees with the figures issue 21 measured on the real
files: Llama 3.1's 131072 / 8192, Qwen2.5's 1.138629, DeepSeek's 1.5896 / 1.8739).
"""

HF = "https://huggingface.co/{}/blob/main/config.json"

YARN_LLAMA_2 = {"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 32,
                "rope_theta": 10000.0}
YARN_MISTRAL = {"model_type": "mistral", "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
                "max_position_embeddings": 32768, "rope_theta": 10000.0, "sliding_window": 131072,
                # the authors' remote code (beta 128 / 2, 0.07 ln s + 1); transformers without it uses 32 / 1 / 0.1
                "auto_map": {"AutoConfig": "configuration_mistral.MistralConfig",
                             "AutoModelForCausalLM": "modeling_mistral_yarn.MistralForCausalLM"}}
DEEPSEEK_YARN = {"beta_fast": 32, "beta_slow": 1, "factor": 40, "original_max_position_embeddings": 4096,
                 "type": "yarn"}

CONFIGS = [
    # not checked here: the released form {"type": "yarn", "factor": 16 / 32, original 4096, "finetuned": true}
    ("Yarn-Llama-2-7b-64k", {**YARN_LLAMA_2, "max_position_embeddings": 65536,
                             "rope_scaling": {"factor": 16.0, "finetuned": True,
                                              "original_max_position_embeddings": 4096, "type": "yarn"}},
     HF.format("NousResearch/Yarn-Llama-2-7b-64k")),
    ("Yarn-Llama-2-7b-128k", {**YARN_LLAMA_2, "max_position_embeddings": 131072,
                              "rope_scaling": {"factor": 32.0, "finetuned": True,
                                               "original_max_position_embeddings": 4096, "type": "yarn"}},
     HF.format("NousResearch/Yarn-Llama-2-7b-128k")),
    # not checked here: factor 8 / 16 over original 8192, max_position_embeddings 32768
    ("Yarn-Mistral-7b-64k", {**YARN_MISTRAL, "rope_scaling": {"factor": 8.0, "finetuned": True,
                                                              "original_max_position_embeddings": 8192, "type": "yarn"}},
     HF.format("NousResearch/Yarn-Mistral-7b-64k")),
    ("Yarn-Mistral-7b-128k", {**YARN_MISTRAL, "rope_scaling": {"factor": 16.0, "finetuned": True,
                                                               "original_max_position_embeddings": 8192, "type": "yarn"}},
     HF.format("NousResearch/Yarn-Mistral-7b-128k")),
    # not checked here (the values docs/notes and issue 21 quote: 131072 / 8192, factor 8, 1 / 4)
    ("Llama-3.1-8B", {"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
                      "max_position_embeddings": 131072, "rope_theta": 500000.0,
                      "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                       "original_max_position_embeddings": 8192, "rope_type": "llama3"}},
     HF.format("meta-llama/Llama-3.1-8B")),
    ("Llama-3.2-1B", {"model_type": "llama", "hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 8,
                      "head_dim": 64, "max_position_embeddings": 131072, "rope_theta": 500000.0,
                      "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                       "original_max_position_embeddings": 8192, "rope_type": "llama3"}},
     HF.format("meta-llama/Llama-3.2-1B")),
    # not checked here: plain RoPE with rope_theta 1e6, max_position_embeddings 16384
    ("CodeLlama-7b", {"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 32,
                      "max_position_embeddings": 16384, "rope_theta": 1000000.0, "rope_scaling": None},
     HF.format("codellama/CodeLlama-7b-hf")),
    # config.json as published (no rope_scaling) plus the block its model card says to add for > 32768 tokens
    ("Qwen2.5-7B-Instruct-YaRN", {"model_type": "qwen2", "hidden_size": 3584, "num_attention_heads": 28,
                                  "num_key_value_heads": 4, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
                                  "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 32768,
                                                   "type": "yarn"}},
     "written from the model card (https://huggingface.co/Qwen/Qwen2.5-7B-Instruct, 'Processing Long Texts')"),
    # checked: a copy of the published config (max 163840, 16 heads, qk_rope_head_dim 64, mscale 0.707 / 0.707)
    ("DeepSeek-V2-Lite", {"model_type": "deepseek_v2", "hidden_size": 2048, "num_attention_heads": 16,
                          "num_key_value_heads": 16, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
                          "kv_lora_rank": 512, "q_lora_rank": None, "max_position_embeddings": 163840,
                          "rope_theta": 10000, "rope_scaling": {**DEEPSEEK_YARN, "mscale": 0.707,
                                                                "mscale_all_dim": 0.707}},
     HF.format("deepseek-ai/DeepSeek-V2-Lite")),
    # not checked here: mscale 1.0 / mscale_all_dim 1.0 (softmax x (0.1 ln 40 + 1)^2 = 1.8739, as issue 21 measured)
    ("DeepSeek-V3", {"model_type": "deepseek_v3", "hidden_size": 7168, "num_attention_heads": 128,
                     "num_key_value_heads": 128, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
                     "kv_lora_rank": 512, "q_lora_rank": 1536, "max_position_embeddings": 163840, "rope_theta": 10000,
                     "rope_scaling": {**DEEPSEEK_YARN, "mscale": 1.0, "mscale_all_dim": 1.0}},
     HF.format("deepseek-ai/DeepSeek-V3")),
    # not checked here: head_dim 64 (hidden 2880, 64 heads: head_dim is not hidden / heads), theta 150000
    ("gpt-oss-20b", {"model_type": "gpt_oss", "hidden_size": 2880, "num_attention_heads": 64, "num_key_value_heads": 8,
                     "head_dim": 64, "max_position_embeddings": 131072, "rope_theta": 150000,
                     "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                      "original_max_position_embeddings": 4096, "rope_type": "yarn",
                                      "truncate": False}},
     HF.format("openai/gpt-oss-20b")),
    # checked: a copy of Phi-3.5-mini-instruct's published config (the Phi-3-mini-128k-instruct lists could not be
    # found; both are phi3 with longrope, head 3072 / 32 = 96, original 4096 at the TOP level, max 131072)
    ("Phi-3.5-mini-instruct-longrope", {
        "model_type": "phi3", "hidden_size": 3072, "num_attention_heads": 32, "num_key_value_heads": 32,
        "max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "rope_theta": 10000.0,
        "rope_scaling": {"type": "longrope", "long_factor": [
            1.0800000429153442, 1.1100000143051147, 1.1399999856948853, 1.340000033378601, 1.5899999141693115,
            1.600000023841858, 1.6200000047683716, 2.620000123977661, 3.2300000190734863, 3.2300000190734863,
            4.789999961853027, 7.400000095367432, 7.700000286102295, 9.09000015258789, 12.199999809265137,
            17.670000076293945, 24.46000099182129, 28.57000160217285, 30.420001983642578, 30.840002059936523,
            32.590003967285156, 32.93000411987305, 42.320003509521484, 44.96000289916992, 50.340003967285156,
            50.45000457763672, 57.55000305175781, 57.93000411987305, 58.21000289916992, 60.1400032043457,
            62.61000442504883, 62.62000274658203, 62.71000289916992, 63.1400032043457, 63.1400032043457,
            63.77000427246094, 63.93000411987305, 63.96000289916992, 63.970001220703125, 64.02999877929688,
            64.06999969482422, 64.08000183105469, 64.12000274658203, 64.41000366210938, 64.4800033569336,
            64.51000213623047, 64.52999877929688, 64.83999633789062],
            "short_factor": [
            1.0, 1.0199999809265137, 1.0299999713897705, 1.0299999713897705, 1.0499999523162842,
            1.0499999523162842, 1.0499999523162842, 1.0499999523162842, 1.0499999523162842, 1.0699999332427979,
            1.0999999046325684, 1.1099998950958252, 1.1599998474121094, 1.1599998474121094, 1.1699998378753662,
            1.2899998426437378, 1.339999794960022, 1.679999828338623, 1.7899998426437378, 1.8199998140335083,
            1.8499997854232788, 1.8799997568130493, 1.9099997282028198, 1.9399996995925903, 1.9899996519088745,
            2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346,
            2.0199997425079346, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914,
            2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914,
            2.0799996852874756, 2.0899996757507324, 2.189999580383301, 2.2199995517730713, 2.5899994373321533,
            2.729999542236328, 2.749999523162842, 2.8399994373321533]}},
     HF.format("microsoft/Phi-3.5-mini-instruct")),
    # transformers' "dynamic" (NTK-aware base that grows with the length) with its factor a = 2
    ("HF-dynamic-factor-2", {"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32,
                             "max_position_embeddings": 4096, "rope_theta": 10000.0,
                             "rope_scaling": {"type": "dynamic", "factor": 2.0}},
     "written from the transformers documentation of rope_scaling 'dynamic' (Llama 2 7B's shape)"),
    # Position Interpolation (Eq. 10) as transformers writes it: max_position_embeddings stays L
    ("Linear-PI-factor-4", {"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32,
                            "max_position_embeddings": 4096, "rope_theta": 10000.0,
                            "rope_scaling": {"type": "linear", "factor": 4.0}},
     "written from the transformers documentation of rope_scaling 'linear' (Llama 2 7B's shape)"),
    # yarn with the temperature switched off: attention_factor replaces Eq. 22
    ("YaRN-attention-factor-1", {"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32,
                                 "max_position_embeddings": 65536, "rope_theta": 10000.0,
                                 "rope_scaling": {"rope_type": "yarn", "factor": 16.0,
                                                  "original_max_position_embeddings": 4096,
                                                  "attention_factor": 1.0}},
     "written from the transformers documentation of rope_scaling 'yarn' (Yarn-Llama-2-64k with attention_factor 1.0)"),
]

BY_NAME = {name: cfg for name, cfg, _ in CONFIGS}
