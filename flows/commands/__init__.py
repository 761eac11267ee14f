"""One module per ``grpo`` subcommand. Each defines ``register(subparsers)``, adding a parser whose
``set_defaults(func=...)`` runs the command and returns an exit code. Heavy imports (torch,
Prefect, MLflow, GX) happen inside the command functions, so ``grpo --help`` stays fast."""
