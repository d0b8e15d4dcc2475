"""Training entry point (Hydra + Lightning) — not built yet.

Training with Hydra configs arrives with the training issue. Until then the project's main job is the heads demo:
``bash scripts/run.sh`` (or ``python scripts/demo_heads.py``).
"""
import sys

if __name__ == "__main__":
    print("aggnets: training (python train.py with Hydra configs) is not implemented yet; it arrives with the "
          "training issue. Run the heads demo instead: bash scripts/run.sh", file=sys.stderr)
    sys.exit(1)
