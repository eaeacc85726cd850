"""Saving and checking the LoRA adapter, where the model already is: on a Ray worker.

The driver never loads weights (a RayJob head has neither the memory nor the GPU for a 7B model
in fp32).  Rank 0 saves the adapter at the end of training and reloads it next to the trained
model to check it (:func:`save_and_verify`); the count of changed tensors comes back to the
driver in ``private/train/adapter_check.json``.  A finished run whose adapter folder was lost is
re-saved from its final checkpoint by a Ray task (:func:`resave_on_ray`), not on the driver.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from dpray.stages.train_generator.plan import LoraLayout

CHECK_FILE = "adapter_check.json"
STAGE_NAME = "train-generator"


def build_lora_model(model_path: str, layout: LoraLayout):
    """Base model + fresh LoRA adapter, initialised from ``layout.init_seed`` (same on all ranks)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(layout.init_seed)
    base = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.float32, local_files_only=True
    )
    lora = layout.lora_config()
    return get_peft_model(base, lora), lora


def save_adapter(model, state: dict[str, torch.Tensor], adapter_dir: Path) -> None:
    """Write ``state`` (trainable tensors by name) into ``model`` and save it as a PEFT adapter."""
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            named[name].copy_(value)
    for config in model.peft_config.values():
        # peft keeps target modules as a set, saved in hash order, which differs per process: a
        # sorted list makes the adapter byte-identical wherever it is saved (rank 0 or a re-save)
        if isinstance(config.target_modules, set):
            config.target_modules = sorted(config.target_modules)
    shutil.rmtree(adapter_dir, ignore_errors=True)
    model.save_pretrained(str(adapter_dir))


def verify_adapter(model_path: str, adapter_dir: Path, trained) -> int:
    """Reload the adapter; check weights round-trip and moved away from init; return #changed.

    (Opacus has silently corrupted LoRA weights with some peft versions: check, don't trust.)
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True)
    reloaded = PeftModel.from_pretrained(base, str(adapter_dir))
    trained_state = {n: p for n, p in trained.named_parameters() if "lora_" in n}
    reloaded_state = {n: p for n, p in reloaded.named_parameters() if "lora_" in n}
    if set(trained_state) != set(reloaded_state):
        raise RuntimeError(f"{STAGE_NAME}: adapter reload has different LoRA tensors")
    changed = 0
    for name, value in trained_state.items():
        if not torch.allclose(value.detach().cpu(), reloaded_state[name].detach().cpu()):
            raise RuntimeError(f"{STAGE_NAME}: adapter tensor {name} did not round-trip")
        if "lora_B" in name and bool(value.abs().sum() > 0):
            changed += 1  # LoRA B starts at zero: non-zero means training moved it
    if changed == 0:
        raise RuntimeError(f"{STAGE_NAME}: no LoRA weight changed during training")
    return changed


def save_and_verify(model, state, model_path: str, adapter_dir: Path, check_file: Path, run_id):
    """Rank 0 at the end of training: save, verify, and leave the result for the driver."""
    save_adapter(model, state, adapter_dir)
    changed = verify_adapter(model_path, adapter_dir, model)
    check_file.write_text(json.dumps({"run_id": run_id, "lora_tensors_changed": changed}))
    return changed


def read_check(private_dir: Path, run_id: str) -> int:
    """The changed-tensor count rank 0 recorded for ``run_id`` (an error if it did not)."""
    path = Path(private_dir) / CHECK_FILE
    try:
        check = json.loads(path.read_text())
    except (OSError, ValueError):
        check = {}
    if check.get("run_id") != run_id:
        raise RuntimeError(f"{STAGE_NAME}: rank 0 did not record the adapter check in {path}")
    return int(check["lora_tensors_changed"])


def _resave(model_path: str, layout: LoraLayout, checkpoint: str, adapter_dir: str) -> int:
    from dpray.stages.train_generator.worker import WEIGHTS_FILE

    model, _ = build_lora_model(model_path, layout)
    save_adapter(model, torch.load(Path(checkpoint) / WEIGHTS_FILE), Path(adapter_dir))
    return verify_adapter(model_path, Path(adapter_dir), model)


def resave_on_ray(
    model_path: str, layout: LoraLayout, checkpoint: Path, adapter_dir: Path, cpus: int
) -> int:
    """Rebuild the adapter from a final checkpoint in a Ray task; return #changed tensors."""
    import ray

    task = ray.remote(num_cpus=cpus, max_retries=1)(_resave)
    return ray.get(task.remote(model_path, layout, str(checkpoint), str(adapter_dir)))
