"""Renders conversations with the chat templates lmforge implements, through transformers' own
Jinja renderer (what apply_chat_template(tokenize=False) does): the reference for
tests/tokenizer/test_chat_template.cpp.

  chat_template_ref.py --conversations in.json --out out.json

in.json: [[{"role", "content"}, ...], ...]; out.json: {"llama3": [str, ...], "chatml": [...]}, each
conversation rendered with and without the generation prompt ("<format>+gen").
"""
import argparse
import json

from transformers.utils.chat_template_utils import render_jinja_template

# Meta-Llama-3-8B-Instruct's tokenizer_config.json template (the Llama 3.0 one).
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
# ChatML as in the transformers docs (and Qwen's templates without a default system turn).
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

ap = argparse.ArgumentParser()
ap.add_argument("--conversations", required=True)
ap.add_argument("--out", required=True)
a = ap.parse_args()
conversations = json.load(open(a.conversations, encoding="utf-8"))
out = {}
for name, template in (("llama3", LLAMA3), ("chatml", CHATML)):
    for gen in (False, True):
        rendered = render_jinja_template(
            conversations, chat_template=template, add_generation_prompt=gen,
            bos_token="<|begin_of_text|>")
        if isinstance(rendered, tuple):  # (rendered, generation indices) in some versions
            rendered = rendered[0]
        out[name + ("+gen" if gen else "")] = rendered
json.dump(out, open(a.out, "w", encoding="utf-8"), ensure_ascii=False)
