"""PEFT's side of whet's LoRA tests (engine/tests/lora.rs).

make BASE BATCH OUT: an adapter on the base (the fixture model) with rsLoRA, a target regex and modules_to_save
            (lm_head), random non-zero B and a changed lm_head copy; writes OUT/adapter_* and
            OUT/logits.safetensors (eval-mode logits on BATCH, a batch.json).
check BASE BATCH DIR LOGITS: PeftModel.from_pretrained(base, DIR) loads with no missing or unexpected keys
            and gives the logits in LOGITS (max abs difference printed; exit 1 above 1e-4).
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

BASE, BATCH = Path(sys.argv[2]), Path(sys.argv[3])


def base():
    return AutoModelForCausalLM.from_pretrained(str(BASE), dtype=torch.float32)


def logits(model):
    batch = json.loads(BATCH.read_text())
    ids = torch.tensor(batch["input_ids"])
    mask = torch.tensor(batch["attention_mask"])
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.contiguous()


def make(out):
    torch.manual_seed(1234)
    config = LoraConfig(
        r=4,
        lora_alpha=16,
        use_rslora=True,
        lora_dropout=0.0,
        target_modules=r".*\.layers\.1\..*(q_proj|down_proj)",
        modules_to_save=["lm_head"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base(), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.05)
            if "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.02)
    model.save_pretrained(out)
    save_file({"logits": logits(model)}, os.path.join(out, "logits.safetensors"))


def check(folder, want_file):
    model = PeftModel.from_pretrained(base(), folder)
    saved = set(load_file(os.path.join(folder, "adapter_model.safetensors")).keys())
    from peft import get_peft_model_state_dict

    canon = set(get_peft_model_state_dict(model).keys())
    if saved != canon:
        print(f"keys differ from PEFT's own: {sorted(saved ^ canon)[:6]}")
        sys.exit(1)
    want = load_file(want_file)["logits"]
    diff = (logits(model) - want).abs().max().item()
    print(f"max_abs_diff {diff:.3e}")
    sys.exit(0 if diff <= 1e-4 else 1)


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[4])
    else:
        check(sys.argv[4], sys.argv[5])
