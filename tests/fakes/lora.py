"""A small LoRA adapter for SmolLM2, made with peft: rank 8 on the attention's q and v projections, with
weights set so that it visibly changes what the model says (a freshly initialised adapter changes nothing)."""

from __future__ import annotations

from pathlib import Path


def make_adapter(base: Path, out: Path, seed: int = 0) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM"
    )
    adapted = get_peft_model(model, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, weight in adapted.named_parameters():
            if "lora_B" in name:
                weight.normal_(std=0.5)
    adapted.save_pretrained(out)
    return out


if __name__ == "__main__":
    import sys

    make_adapter(Path(sys.argv[1]), Path(sys.argv[2]), seed=int(sys.argv[3]) if len(sys.argv) > 3 else 0)
