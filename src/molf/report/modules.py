"""Names of routed modules: their type (``q_proj``, ``down_proj``, ...) and layer index.

Defined in :mod:`molf.routing_stats` (training and the report group modules alike);
re-exported here for the report's figures.
"""

from molf.routing_stats import TYPE_ORDER, group_modules, layer_index, module_type, module_types

__all__ = ["TYPE_ORDER", "group_modules", "layer_index", "module_type", "module_types"]
