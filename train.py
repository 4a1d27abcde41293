"""Fine-tune ChatGLM3 with a Hydra-composed config.

    python train.py experiment=quickstart                      # tiny model + sample data, CPU, minutes
    python train.py method=lora training_args.max_steps=3000   # documented defaults, model.path=... data.data_dir=...
    python train.py -m method.r=4,8,16                          # sweep; compare runs in the MLflow UI
    python train.py ... dry_run=true                            # compose, validate, render; load nothing
"""

from glm_ft.cli import main

if __name__ == "__main__":
    main()
