"""``python -m hardfocus_fused.demo``: the demo lives in :mod:`hardfocus_fused.experiment.demo`."""

from .experiment.demo import main

if __name__ == "__main__":
    main()
