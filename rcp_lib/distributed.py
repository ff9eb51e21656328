"""Where a process runs and how a (possibly sharded) model's weights are gathered: the two helpers that the run-config
command (:mod:`rcp_lib.run_config`) and the table layer (:mod:`rcp_lib.experiments.build`) share, so that neither
imports the other."""

from __future__ import annotations


def run_device(requested: str):
    """The device of this process for a run that asks for ``requested``: under ``accelerate launch`` / ``torchrun`` a
    CUDA run gets this process's GPU (``PartialState().device``; a bare ``"cuda"`` would be GPU 0 in every process).

    Raises:
        RuntimeError: ``requested`` is a CUDA device but this process sees none.
    """
    import torch
    from accelerate import PartialState

    if torch.device(requested).type != "cuda":
        return torch.device(requested)
    if not torch.cuda.is_available():
        raise RuntimeError(f"the run config asks for device {requested!r} but no CUDA device is visible; "
                           "use device: cpu (configs/cpu.yaml) or run on a GPU machine")
    dev = PartialState().device
    return dev if dev.type == "cuda" else torch.device(requested)


def is_sharded(model) -> bool:
    """True when some parameter of ``model`` is a DTensor shard (FSDP2)."""
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def full_state_dict(model) -> dict:
    """The full (unsharded) state dict of ``model`` on the CPU, gathered from every rank when it is sharded (FSDP):
    a collective, so every process calls it. An unsharded model: its own state dict, moved to the CPU."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}
