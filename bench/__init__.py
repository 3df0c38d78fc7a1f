"""Benchmarks. Importing fastvlm_mlx first preloads the optimized BLAS before mlx loads."""

import click

import fastvlm_mlx  # noqa: F401


def model_options(command):
    """A benchmark's `--synthetic SIZE` (random weights at a real FastVLM size, `size`) and `--model DIR`
    (a converted model instead, `model_dir`)."""
    command = click.option("--model", "model_dir", type=click.Path(exists=True), help="A converted model instead.")(
        command
    )
    choice = click.Choice(["0.5b", "1.5b", "7b"])
    return click.option("--synthetic", "size", default="0.5b", show_default=True, type=choice)(command)


def save_new_png(figure, path):
    """`figure` as a PNG at `path`, a new file only (never over what is there); closes the figure."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    with open(path, "xb") as out:
        figure.savefig(out, format="png", dpi=110)
    plt.close(figure)
    return path
