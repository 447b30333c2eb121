"""The commands of `qwenvl-ft COMMAND`, the top of the package: each is a plain function of the composed config,
wrapped by cli.py in `@hydra.main` and by runtime.py's `run_task` (summary.json, plain user errors, sweeps).

  train        train.py        fine-tune with the method trainer= names
  eval         eval.py         held-out generation with the base and the fine-tuned model, metrics side by side
  infer        infer.py        one prompt over images, predictions as JSONL
  merge        merge.py        fold an adapter into its base, a plain transformers model
  chat         chat.py         a Gradio page over the base, base + adapter or a merged model
  data-check   data_check.py   read and validate the whole dataset and report on it
  estimate     estimate.py     a training run's peak GPU memory and FLOPs, from the config
  doctor       doctor.py       the installed versions, the GPU and the kernel paths
  recipes      (cli.py)        the available recipes

sweep.py is the Hydra callback that tables a `-m` sweep's jobs. No module below this package imports a command.
"""
