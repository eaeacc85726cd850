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

from dpray.stages.train_generator.plan import CHECK_FILE, LoraLayout

STAGE_NAME = "train-generator"


def build_lora_model(model_path: str, layout: LoraLayout, device: torch.device | str = "cpu"):
    """Base model + fresh LoRA adapter on ``device``, initialised from ``layout.init_seed``.

    Every rank builds the same adapter (same seed, same device type), so the replicas start
    identical without a broadcast.  The frozen base is loaded straight onto ``device`` in
    :func:`~dpray.stages.train_generator.device.base_dtype` (bf16 on a GPU), so a GPU worker
    never holds an fp32 copy in host RAM; the LoRA weights are fp32 everywhere.
    """
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from dpray.stages.train_generator.device import base_dtype, trainable_to_fp32

    device = torch.device(device)
    kwargs = {"device_map": {"": device}} if device.type != "cpu" else {}
    base = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=base_dtype(device), local_files_only=True, **kwargs
    )
    lora = layout.lora_config()
    torch.manual_seed(layout.init_seed)
    model = get_peft_model(base, lora)
    trainable_to_fp32(model)
    return model.to(device), lora


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
    The saved tensors are read back from the adapter folder and compared with the trained
    model's, name by name, on the CPU; no second copy of the base model is loaded (at 7B that
    would be another 14-28 GB on the worker).  ``model_path`` is kept for the error message.
    """
    from peft import PeftConfig
    from peft.utils import get_peft_model_state_dict, load_peft_weights

    config = PeftConfig.from_pretrained(str(adapter_dir))
    expected = sorted(trained.peft_config["default"].target_modules)
    if sorted(config.target_modules) != expected:
        raise RuntimeError(f"{STAGE_NAME}: adapter config for {model_path} lists other modules")
    trained_state = get_peft_model_state_dict(trained)
    reloaded_state = load_peft_weights(str(adapter_dir), device="cpu")
    if set(trained_state) != set(reloaded_state):
        raise RuntimeError(f"{STAGE_NAME}: adapter reload has different LoRA tensors")
    changed = 0
    for name, value in trained_state.items():
        if not torch.allclose(value.detach().float().cpu(), reloaded_state[name].float()):
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
    state = torch.load(Path(checkpoint) / WEIGHTS_FILE, map_location="cpu")
    save_adapter(model, state, Path(adapter_dir))
    return verify_adapter(model_path, Path(adapter_dir), model)


def resave_on_ray(
    model_path: str, layout: LoraLayout, checkpoint: Path, adapter_dir: Path, cpus: int
) -> int:
    """Rebuild the adapter from a final checkpoint in a Ray task; return #changed tensors."""
    import ray

    task = ray.remote(num_cpus=cpus, max_retries=1)(_resave)
    return ray.get(task.remote(model_path, layout, str(checkpoint), str(adapter_dir)))
