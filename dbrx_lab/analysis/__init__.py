"""Analysis: pure functions from traces (or route-stats tables) to pandas DataFrames; no plotting.

Routing statistics accept a Trace, a list of Traces, a routing DataFrame or a route-stats output folder,
and ignore padding. Every function's docstring states its definition and its random baseline.

    from dbrx_lab import analysis
    analysis.expert_load(trace)                    # per layer and expert: share vs k/E, top-1 share vs 1/E
    analysis.routing_repetition(traces)            # P(same top-1 at t, t+1) vs 1/E, ...
    analysis.logit_lens(model, "text")             # per layer and position: next token's prob / rank
    analysis.ablation_sweep(model, texts)          # layer x expert loss change
    analysis.compare_generations(model, "Once", ExpertAblation(1, [3], "reroute"))
    analysis.expert_cards("runs/demo-routing", model)   # one card per (layer, expert)
    analysis.path_purity(analysis.routing_paths(folder)) # paths of expert sets vs single experts
"""
from .ablation import DropTopExperts, LossEvaluator, ablation_sweep, drop_top_curve, top_k_curve
from .attribution import LogitAttribution, logit_attribution
from .audit import CausalAudit, audit_statistics, expert_audit
from .causal import attribution_patching, expert_coalition, expert_patching, patching_agreement
from .contrastive import SteeringEffect, contrastive_experts, steering_effect
from .counterfactual import CounterfactualRouting, counterfactual_routing
from .cards import ExpertCard, ExpertCards, expert_cards
from .lens import LogitLens, logit_lens
from .compare import CompareStep, GenerationComparison, align_tokens, compare_generations, routing_cascade
from .routing import (Routing, coactivation, coactivation_intervals, confidence_summary, expert_load,
                      fragile_tokens, iter_routing, layer_transitions, load_intervals, load_routing,
                      repetition_baselines, router_confidence, routing_frame, routing_repetition,
                      repetition_intervals, specialization_intervals)
from .paths import (PathClusters, cluster_paths, path_counts, path_purity, purity, routing_paths, token_class,
                    token_classes)
from .specialization import domain_specialization, top_tokens_per_expert, vocab_specialization

__all__ = [
    "Routing", "iter_routing", "routing_frame", "load_routing",
    "expert_load", "router_confidence", "confidence_summary", "fragile_tokens", "routing_repetition",
    "repetition_baselines", "coactivation", "layer_transitions",
    "load_intervals", "coactivation_intervals", "specialization_intervals", "repetition_intervals",
    "domain_specialization", "vocab_specialization", "top_tokens_per_expert",
    "LogitAttribution", "logit_attribution", "LogitLens", "logit_lens",
    "DropTopExperts", "LossEvaluator", "ablation_sweep", "drop_top_curve", "top_k_curve",
    "CompareStep", "GenerationComparison", "align_tokens", "compare_generations", "routing_cascade",
    "ExpertCard", "ExpertCards", "expert_cards",
    "routing_paths", "path_counts", "cluster_paths", "PathClusters", "purity", "path_purity", "token_class",
    "token_classes",
    "expert_patching", "expert_coalition", "attribution_patching", "patching_agreement",
    "CausalAudit", "expert_audit", "audit_statistics", "CounterfactualRouting", "counterfactual_routing",
    "SteeringEffect", "contrastive_experts", "steering_effect",
]
