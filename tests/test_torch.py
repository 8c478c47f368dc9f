"""A real torch model whose weights live in daemon memory computes the same after sleeping."""

import pytest

torch = pytest.importorskip("torch")

from sleepd.client import SleepClient  # noqa: E402


@pytest.fixture
def backend():
    """Host only: CUDA tensors over the driver double would need a CUDA build of
    torch; tests/gpu runs these scenarios on a real GPU."""
    return "host"


class TinyTransformer(torch.nn.Module):
    def __init__(self, vocab=512, dim=64, heads=4, layers=2):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        layer = torch.nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, batch_first=True, dropout=0.0)
        self.encoder = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied weights stay tied
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, tokens):
        return self.head(self.norm(self.encoder(self.embed(tokens)))) * self.scale


def test_an_adopted_transformer_gives_the_same_outputs_after_a_level_1_sleep(daemon):
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    tokens = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        expected = model(tokens)

    with SleepClient.connect("tiny", socket=daemon.socket) as client:
        regions = client.adopt(model, tag="weights")
        params = list(model.parameters()) + list(model.buffers())
        assert len(regions) < len(params) / 4, "tensors must be packed into a few regions"
        spans = [(r.address, r.address + r.size) for r in regions]
        for tensor in params:
            assert any(lo <= tensor.data_ptr() < hi for lo, hi in spans), "a tensor was left outside daemon memory"
        assert model.head.weight is model.embed.weight
        with torch.no_grad():
            assert torch.equal(model(tokens), expected)

        client.sleep(level=1)
        assert client.is_sleeping()
        assert {r.state.value for r in regions} == {"offloaded"}
        client.wake()
        assert not client.is_sleeping()

        with torch.no_grad():
            assert torch.equal(model(tokens), expected)


def test_adopting_again_moves_only_what_is_new(daemon):
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    with SleepClient.connect("tiny", socket=daemon.socket) as client:
        client.adopt(model, tag="weights")
        where = {name: tensor.data_ptr() for name, tensor in model.state_dict().items()}
        assert client.adopt(model, tag="weights") == [], "tensors already in sleepd were moved again"
        model.extra = torch.nn.Linear(4, 4)  # added after the first adopt (as LoRA's layers are)
        (added,) = client.adopt(model, tag="weights")
        assert added.address <= model.extra.weight.data_ptr() < added.address + added.size
        assert all(model.state_dict()[name].data_ptr() == address for name, address in where.items())


def test_region_tensors_are_views_without_a_copy(daemon):
    with SleepClient.connect("views", socket=daemon.socket) as client:
        region = client.alloc(1 << 20, tag="kv_cache")
        kv = region.tensor(torch.float16, (256, 512))
        assert kv.data_ptr() == region.address
        kv.fill_(1.5)
        assert bytes(region.memoryview[:2]) == b"\x00\x3e"  # 1.5 in little-endian float16
        with pytest.raises(ValueError, match="do not fit"):
            region.tensor(torch.float32, (1024, 1024))
        client.sleep(level=1)
        with pytest.raises(RuntimeError, match="wake the model"):
            region.tensor(torch.float16, (4,))
        client.wake()
        assert region.tensor(torch.float16, (256, 512)).abs().sum().item() == 0  # discarded: zeros
        assert region.tensor(torch.float16, (4,)).data_ptr() == kv.data_ptr()


def test_pool_needs_the_cuda_backend(daemon):
    with SleepClient.connect("qwen", socket=daemon.socket) as client:
        with pytest.raises(RuntimeError, match="host backend"):
            with client.pool("weights"):
                pass


def test_pool_blocks_switch_expandable_segments_off_and_leave_them_as_they_found_them():
    from sleepd.client.torch_pool import _expandable_segments_off, _expandable_segments_on, _set_allocator_settings

    for before in (True, False):
        _set_allocator_settings(f"expandable_segments:{before}")
        with _expandable_segments_off():
            with _expandable_segments_off():  # another thread's pool() block, say
                assert not _expandable_segments_on()
            assert not _expandable_segments_on(), "the inner block turned them on under the outer one"
        assert _expandable_segments_on() is before
