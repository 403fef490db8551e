"""Explaining and probing models through the contract: attention maps and rollout (the attention seam), CAMs at
any stage (stage modules + ``forward_intermediates``), faithfulness, TokenCut and robustness probes."""
from .api import ATTENTION_METHODS, METHODS, Explanation, applicable_methods, explain
from .attention import AttentionMap, AttentionRecorder, HeadMaps, attention_maps, head_maps, record_attention
from .cam import CAM_METHODS, CamResult, StageTap, cam
from .faithfulness import deletion_insertion, pointing_game, random_maps, random_pointing_baseline
from .heads import HeadImportance, head_importance
from .robust import CORRUPTIONS, PROBES, RobustReport, corrupt, robustness
from .rollout import Rollout, attention_rollout, token_matrix
from .tokencut import TokenCutResult, tokencut

__all__ = ["ATTENTION_METHODS", "CAM_METHODS", "CORRUPTIONS", "METHODS", "PROBES", "AttentionMap",
           "AttentionRecorder", "CamResult", "Explanation", "HeadImportance", "HeadMaps", "RobustReport", "Rollout",
           "StageTap", "TokenCutResult", "applicable_methods", "attention_maps", "attention_rollout", "cam", "corrupt",
           "deletion_insertion", "explain", "head_importance", "head_maps", "pointing_game", "random_maps",
           "random_pointing_baseline", "record_attention", "robustness", "token_matrix", "tokencut"]
