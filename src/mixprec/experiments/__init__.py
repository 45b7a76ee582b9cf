"""Built-in data, models and the recipe comparison behind ``mixprec compare``.

>>> from mixprec.experiments import CompareConfig, run_compare, save_results
>>> results = run_compare(CompareConfig(recipes=("fp32", "bf16-mixed"), steps=100))
>>> save_results(results, "runs/my-compare")
"""
from .compare import (BASELINE, DEFAULT_RECIPES, CompareConfig, divergence_step, load_results,
                      run_compare, save_results, split_recipes)
from .data import (Dataset, Task, iterate_batches, load_digits_dataset, load_text_dataset,
                   stdlib_corpus)
from .models import CharTransformer, digits_cnn, digits_mlp
from .schema import load_schema, schema_errors, validate_results
from .train import SavedTensorBytes, TrainConfig, grad_log2_histogram, train_recipe
from .workloads import WORKLOADS, Workload, get_workload, load_factory, resolve_workload

__all__ = [
    "BASELINE", "DEFAULT_RECIPES", "CompareConfig", "divergence_step", "load_results",
    "run_compare", "save_results", "split_recipes",
    "Dataset", "Task", "iterate_batches", "load_digits_dataset", "load_text_dataset",
    "stdlib_corpus",
    "CharTransformer", "digits_cnn", "digits_mlp",
    "load_schema", "schema_errors", "validate_results",
    "SavedTensorBytes", "TrainConfig", "grad_log2_histogram", "train_recipe",
    "WORKLOADS", "Workload", "get_workload", "load_factory", "resolve_workload",
]
