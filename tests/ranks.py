"""Spawning gloo process groups for the multi-process tests (CPU, 2 ranks)."""

import gc

import torch.distributed as dist
import torch.multiprocessing as mp


def spawn_ranks(body, init_file: str, *args, world: int = 2) -> None:
    """Run ``body(rank, world, *args)`` in ``world`` spawned processes forming a gloo group.

    ``body`` must be a module-level function (it is pickled by name).  A failure in any
    rank fails the call with that rank's traceback.
    """
    mp.spawn(_rank_main, args=(world, init_file, body, args), nprocs=world, join=True)


def _rank_main(rank, world, init_file, body, args):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        body(rank, world, *args)
        finish_group()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def finish_group() -> None:
    """Tear this rank's group down cleanly once its work is done.

    ``body``'s locals are gone by now; collecting their reference cycles (DDP and FSDP
    modules form some) releases the gloo work they hold while the interpreter is fully
    alive: left to interpreter shutdown, that release sometimes aborted a rank ("terminate
    called without an active exception").  The barrier keeps a rank from destroying its
    group while the other still uses it.  After a failure neither runs; ``mp.spawn`` stops
    the other rank.
    """
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
