"""Multi-domain fine-tuning: the training-step engine (`engine`) and, later, the trainer."""

from megatron_desmoe.training.engine import (
    StepResult,
    TrainHooks,
    build_lr_scheduler,
    build_optimizer,
    build_training_model,
    gpt_forward_step,
    loss_is_finite,
    main_params_of,
    make_forward_step,
    masked_token_loss,
    optimizer_step_skipping,
    train_step,
    unwrap_model,
)

__all__ = [
    "StepResult",
    "TrainHooks",
    "build_lr_scheduler",
    "build_optimizer",
    "build_training_model",
    "gpt_forward_step",
    "loss_is_finite",
    "main_params_of",
    "make_forward_step",
    "masked_token_loss",
    "optimizer_step_skipping",
    "train_step",
    "unwrap_model",
]
