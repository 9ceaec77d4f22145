"""How transformers reads config.json dicts: the RoPE parameters and sliding window its config
classes resolve (defaults, and the precedence of rope_parameters, the legacy rope_scaling and the
top-level rope_theta), the reference for tests/models/test_hf_config.cpp.

  hf_config_ref.py --configs in.json --out out.json

in.json: [config dict, ...]; out.json: [{"rope_theta", "rope_type", "factor" (or null),
"original_max_position_embeddings" (or null), "sliding_window" (or null)}, ...].
"""
import argparse
import json
import logging

import transformers

logging.getLogger("transformers").setLevel(logging.ERROR)
ap = argparse.ArgumentParser()
ap.add_argument("--configs", required=True)
ap.add_argument("--out", required=True)
a = ap.parse_args()
out = []
for d in json.load(open(a.configs)):
    c = transformers.CONFIG_MAPPING[d["model_type"]].from_dict(dict(d))  # as from_pretrained
    p = c.rope_parameters
    out.append({"rope_theta": p["rope_theta"], "rope_type": p.get("rope_type", "default"),
                "factor": p.get("factor"),
                "original_max_position_embeddings": p.get("original_max_position_embeddings"),
                "sliding_window": getattr(c, "sliding_window", None)})
json.dump(out, open(a.out, "w"))
