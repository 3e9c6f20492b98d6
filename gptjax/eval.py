"""`python -m gptjax.eval`: validation loss, perplexity, bits per byte and multiple-choice
accuracy of a run (see `gptjax.evaluate.cli`)."""

from gptjax.evaluate.cli import main

if __name__ == "__main__":
    main()
