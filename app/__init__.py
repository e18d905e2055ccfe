"""The user-facing entry points: the `vqclip` command and what it runs (demo, evaluation report, search,
reconstruction). They sit above the library (`pipelines/` and the stages); nothing imports them."""
