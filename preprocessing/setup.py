"""The package a remote Beam runner's workers install: ``preprocessing`` alone, with
``requirements-worker.txt`` (no torch, deepspeed or mlflow).

Beam builds an sdist of this folder and installs it on each worker. run_beam.py passes
``--setup_file`` to a copy of this folder, its requirements pinned to the installed versions, for
runners with remote workers (preprocessing/worker_package.py); by hand, from a checkout (ranges,
not pins)::

    python preprocessing/run_beam.py --runner=DataflowRunner --setup_file preprocessing/setup.py ...

Run only as a setup script (``__main__``): it is also a module of the installed package.
"""

import os

HERE = os.path.dirname(os.path.abspath(__file__))
REQUIREMENTS = "requirements-worker.txt"


def requirements() -> list[str]:
    with open(os.path.join(HERE, REQUIREMENTS), encoding="utf-8") as f:
        return [line.split("#", 1)[0].strip() for line in f if line.split("#", 1)[0].strip()]


if __name__ == "__main__":
    from setuptools import setup

    setup(
        name="bert-pipeline-preprocessing",
        version="0.1.0",
        description="The Apache Beam preprocessing of bert-pipeline, for Beam workers",
        license="Apache-2.0",
        python_requires=">=3.10",
        # This folder is the package: the sdist holds its modules at the top.
        packages=["preprocessing"],
        package_dir={"preprocessing": "."},
        package_data={"preprocessing": [REQUIREMENTS]},
        install_requires=requirements(),
    )
