"""Performance model: hand-computed formulas, monotonicity, and the choice logic."""
import perfmodel as pm
import spart

L7 = spart.KNOWN["llama-2-7b"][1]


def test_llama2_7b_holds_512_kib_of_fp16_kv_per_token():
    assert pm.kv_bytes_per_token(L7) == 512 * 1024
    assert pm.kv_bytes_per_token(spart.KNOWN["llama-3-8b"][1]) == 128 * 1024  # GQA: 8 KV heads


def test_r_time_by_hand():
    cpu = pm.CPUNode(8, 64, 100)  # 100 GB/s, achieved 80
    t = pm.r_time(L7, 1000, cpu, 1, call_overhead_s=0)
    assert abs(t - 1000 * 524288 / 80e9) < 1e-12


def test_s_time_is_weight_bound_at_batch_1_and_compute_bound_when_large():
    g = pm.GPUS["a10"]
    w = L7.weight_count() * 2 / (600e9 * 0.8)
    assert abs(pm.s_time(L7, 1, g) - w) < 1e-12
    assert pm.s_time(L7, 4096, g) > 10 * w


def test_more_cpu_bandwidth_or_nodes_never_predicts_less():
    base = dict(gpu=pm.GPUS["a10"], link=pm.LINKS["25gbe"], prompt=1024, gen=256)
    prev = 0
    for n in (1, 2, 4, 8, 16):
        tok = pm.predict(L7, cpu=pm.CPUS["xeon-1s"], nodes=n, **base)["fastdecode_tok_s"]
        assert tok >= prev * 0.999
        prev = tok
    prev = 0
    for bw in (20, 50, 100, 200, 400):
        tok = pm.predict(L7, cpu=pm.CPUNode(32, 256, bw), nodes=2, **base)["fastdecode_tok_s"]
        assert tok >= prev * 0.999
        prev = tok


def test_choice_respects_capacity_and_gpu_only_cap():
    r = pm.predict(L7, pm.GPUS["a10"], pm.CPUNode(16, 16, 100), 1, pm.LINKS["25gbe"], 1024, 256)
    assert r["batch_size"] <= r["cpu_capacity_batch"]
    # A10: 24 GB * 0.9 - 13.5 GB of weights leaves ~8 GB: 12 sequences of 1280 tokens at 512 KiB
    assert r["gpu_only_batch"] == int((24e9 * 0.9 - L7.weight_count() * 2) // (524288 * 1280))
