"""rft: Reinforcement Fine-Tuning pipeline (SFT warm-up, PPO/GRPO with graders, Prefect + MLflow)."""

__version__ = "0.1.0"
