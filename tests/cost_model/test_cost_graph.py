"""Per-node costs of a captured graph against the analytic block formulas."""

import pytest

torch = pytest.importorskip("torch")


def test_graph_cost_of_exported_gpt_matches_analytic_flops():
    models = pytest.importorskip("partitioner.models")
    from cost_model.graph_costs import graph_cost, node_cost
    from cost_model.shapes import TransformerShape

    cfg = models.GPTConfig(n_layer=2, n_embd=64, n_head=4, vocab_size=512, seq_len=32)
    model, (ids,) = models.build(cfg, batch=2, seq=32)
    ep = torch.export.export(model, (ids,))
    shape = TransformerShape.from_gpt_config(cfg)
    tokens, s, h = 2 * 32, 32, 64
    matmul = 2 * tokens * (12 * cfg.n_layer * h * h + shape.vocab * h) + 4 * 2 * s * s * h * 2
    for gm in (ep.graph_module, ep.run_decompositions().graph_module):
        mm = 0.0
        for node in gm.graph.nodes:
            name = str(node.target)
            if any(k in name for k in ("linear", "mm", "bmm", "addmm", "attention")):
                mm += node_cost(node).fwd_flops
        assert mm == pytest.approx(matmul, rel=0.01)
        total = graph_cost(gm)
        assert total.fwd_flops >= mm and total.bwd_flops > 1.9 * mm and total.bytes > 0
    views = [n for n in ep.graph_module.graph.nodes if "view" in str(n.target)]
    assert views and all(node_cost(n).fwd_flops == 0 for n in views)
