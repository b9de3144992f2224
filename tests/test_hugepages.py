"""twotower_ext.hugepages: large CPU tensors in mappings advised for huge pages, each with a storage of its own; a
model loaded with every weight there runs bit for bit as one in torch's memory."""
import io
import os
import threading

import pytest
import torch

from twotower_ext import hugepages

HERE = os.path.dirname(__file__)
CKPT = os.path.join(HERE, "data", "parity", "checkpoint")
needs_thp = pytest.mark.skipif(not hugepages.enabled(), reason="the kernel offers no transparent huge pages here")


def mapping_of(addr: int) -> tuple[int, int, set[str]] | None:
    """(start, end, VmFlags) of this process's mapping that holds addr (/proc/self/smaps), or None."""
    found = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                found = (lo, hi) if lo <= addr < hi else None
            elif found and head == "VmFlags:":
                return (*found, set(line.split()[1:]))
    return None


def advised(t: torch.Tensor) -> bool:
    m = mapping_of(t.data_ptr())
    return m is not None and "hg" in m[2]


@needs_thp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8, torch.float8_e4m3fn])
@pytest.mark.parametrize("shape", [(300, 1037), (3, 5, 70001), (9 << 20,)])   # chunk-sized and own-mapping sizes
def test_large_tensors_live_in_advised_mappings_with_storages_of_their_own(dtype, shape):
    t = hugepages.empty(shape, dtype)
    assert t.shape == shape and t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous()
    assert t.data_ptr() % hugepages.ALIGN == 0 and advised(t)
    assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    src = torch.randint(0, 100, shape, dtype=torch.uint8).to(dtype)
    t.copy_(src)
    assert torch.equal(t.view(torch.uint8), src.view(torch.uint8))
    buf = io.BytesIO()
    torch.save(t, buf)   # the tensor's bytes only, not its chunk's
    assert t.nbytes <= len(buf.getvalue()) < t.nbytes + 64 * 1024
    assert torch.equal(torch.load(io.BytesIO(buf.getvalue())).view(torch.uint8), src.view(torch.uint8))


@needs_thp
def test_small_tensors_and_the_switch_stay_with_torch(monkeypatch):
    assert not advised(hugepages.empty((hugepages.MIN_BYTES // 4 - 1,), torch.float32))
    assert hugepages.empty((0, 5), torch.bfloat16).shape == (0, 5)
    monkeypatch.setenv("TWOTOWER_HUGEPAGES", "0")
    assert not hugepages.enabled()
    assert not advised(hugepages.empty((1 << 20,), torch.float32))


@needs_thp
def test_a_mapping_goes_when_its_last_tensor_does():
    t = hugepages.empty((hugepages.CHUNK_BYTES + 12345,), torch.uint8)
    lo, hi, _ = mapping_of(t.data_ptr())
    view = t[5:]
    del t
    assert mapping_of(view.data_ptr())[:2] == (lo, hi)
    del view
    assert mapping_of(lo) is None or mapping_of(lo)[:2] != (lo, hi)


def test_threads_allocating_at_once_get_disjoint_memory():
    sizes = [hugepages.MIN_BYTES, 3 * hugepages.MIN_BYTES + 4, hugepages.CHUNK_BYTES // 3, 1 << 20]
    out: list[list[torch.Tensor]] = [[] for _ in range(8)]

    def work(i):
        for j in range(40):
            t = hugepages.empty((sizes[(i + j) % len(sizes)],), torch.uint8)
            t.fill_(i)
            out[i].append(t)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    spans = sorted((t.data_ptr(), t.data_ptr() + t.nbytes) for ts in out for t in ts)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert all(bool((t == i).all()) for i, ts in enumerate(out) for t in ts)   # nobody wrote over another


def test_other_devices_get_torch_empty():
    assert hugepages.empty((1 << 20,), torch.float32, "meta").device.type == "meta"


def test_a_model_with_every_weight_in_huge_pages_decodes_bit_for_bit(monkeypatch, one_thread):
    """The parity checkpoint's tensors are all under MIN_BYTES: loaded once as they are and once with MIN_BYTES 1,
    the logits of a prefill, an AR step and a denoiser pass are identical (the C++ ops read the mapped weights)."""
    import twotower_ext as tt

    def run():
        lm = tt.load(CKPT, dtype=torch.bfloat16, threads=0)
        m = lm.model
        prompt = torch.arange(5, 17).view(1, -1)
        cache = m.new_cache(1, 64)
        a = m.prefill(prompt, cache)
        b = m.decode(prompt[:, -1], cache)
        x = torch.full((1, 16), 3)
        c = m.denoise(x, cache, torch.tensor([0.5]))
        return m, [a, b, c]

    _, want = run()
    monkeypatch.setattr(hugepages, "MIN_BYTES", 1)
    model, got = run()
    if hugepages.enabled():
        assert advised(model.weights.denoiser.layers[0].norm)
    for w, g in zip(want, got):
        assert torch.equal(w, g)
