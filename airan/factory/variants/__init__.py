"""Variants of a served model, built locally from it (no hub): quantised, pruned, merged, adapted.

`airan model build NAME|all` runs a recipe from `recipes.RECIPES` (`build.build_variant`);
each variant lands in `cache_dir()/models/<name>` with a manifest.json (parent, method,
parameters, calibration or training data hash, parameter count, weight bytes).
"""
from airan.factory.variants.build import (
    VariantBuildError,
    build_all,
    build_variant,
    load_variant_manifest,
    variant_dir,
    variant_spec,
)
from airan.factory.variants.recipes import RECIPES, Recipe, get_recipe

__all__ = [
    "RECIPES",
    "Recipe",
    "VariantBuildError",
    "build_all",
    "build_variant",
    "get_recipe",
    "load_variant_manifest",
    "variant_dir",
    "variant_spec",
]
