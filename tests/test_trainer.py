"""What every method's trainer shares (qwenvl_ft/training/trainer.py)."""

from transformers import TrainerControl, TrainerState, TrainingArguments

from qwenvl_ft.training.trainer import log_last_step_callback


def test_the_last_step_is_logged_whatever_logging_steps_says(tmp_path):
    callback = log_last_step_callback()
    args = TrainingArguments(output_dir=str(tmp_path), logging_steps=10, report_to=[])
    state = TrainerState(max_steps=5)
    logged = []
    for step in range(1, 6):
        state.global_step, control = step, TrainerControl()
        callback.on_step_end(args, state, control)
        logged.append(control.should_log)
    assert logged == [False, False, False, False, True]
