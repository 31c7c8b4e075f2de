"""btune's reporting API: what a user's own script imports to report its steps, phases and model facts.

::

    import btune

    btune.meta(model="llama-1b", n_params=1.2e9, flops_per_token=7.2e9)
    for batch in loader:
        loss = train_step(batch)
        btune.step(tokens=batch.numel(), loss=loss.item())
    with btune.phase("eval"):
        evaluate()

Under btune (``btune run -- python train.py``: ``BTUNE_EVENTS`` names the console's events channel) each call
sends one event; outside btune every call is a no-op (``BTUNE_LOG=1``: one plain line on stderr per call).
A call never raises into the script: a value of the wrong type is left out, with one warning line on stderr
per kind of mistake.

- ``step(tokens=None, loss=None, **metrics)``: one step. The API numbers the steps (0, 1, ...) and times
  each as the wall time since the previous ``step`` call (clock ``host``), or since the last ``phase``
  change, so an eval between two steps is not charged to the next one. The first step holds start-up
  (``first``): the console leaves it out of steady state, and ``warmup=True`` leaves out any other.
  ``metrics``: further numbers (a learning rate, a grad norm) as columns of the step series.
- ``tokens``: the step's tokens for the whole job (global), counted once. Under torchrun (``RANK`` and
  ``WORLD_SIZE`` in the environment) only rank 0's tokens are sent, the other ranks' are left out; with
  ``meta(tokens="per_replica")`` each replica passes its own count and rank 0 sends it times
  ``WORLD_SIZE`` (replicas of equal batches, as in DDP/FSDP; with unequal ones, pass the global count).
- ``phase(name, detail=None, k=None, n=None)``: where the script is ("eval", "checkpoint", ...); as a
  context manager it goes back to the phase before on exit.
- ``meta(**facts)``: the model and its costs, so the console computes MFU and MBU as for its own
  workloads: ``model``, ``n_params``, ``flops_per_token`` (training FLOPs per token, 6N for a dense
  forward+backward), ``weight_bytes`` and ``kv_bytes_per_token`` (bytes a step must move), ``device_name``,
  ``n_devices`` (defaults to ``WORLD_SIZE``), ``precision``, ``tokens`` ("global" or "per_replica"); other
  facts (numbers or strings) are kept as they are.
- A memory profile: under ``btune run --memory-profile N -- CMD`` (``BTUNE_MEMORY_PROFILE=N``) rank 0 records
  CUDA memory history from step 1 through step N (step 0 holds start-up), saves the snapshot beside the run
  record (open it at https://pytorch.org/memory_viz) and sends the peak and its top allocation sites; only
  then is torch imported (``workloads.memprofile``). Without CUDA: one line on stderr, and the script runs on.

The Python standard library only: ``import btune`` loads nothing else; under btune the first call opens the
channel through ``workloads.protocol``'s Emitter. Steps are counted per process; report them from one thread.
"""

from btune.api import enabled, meta, phase, step

__all__ = ["enabled", "meta", "phase", "step"]
