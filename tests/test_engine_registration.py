"""What the plugin registers in every vLLM process, and the backend's KV cache reader."""
import pickle
import subprocess
import sys

import pytest
import torch


@pytest.fixture(scope="module")
def plugin():
    from vllm.plugins import load_general_plugins

    load_general_plugins()


@pytest.mark.parametrize("name", ["sentinel", "SENTINEL", "Sentinel"])
def test_the_backend_name_is_accepted_in_any_case(plugin, name):
    from vllm.config import AttentionConfig
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    backend = AttentionConfig(backend=name).backend
    assert backend is AttentionBackendEnum.CUSTOM
    assert backend.get_path() == "vllm_sentinel.engine.backend.SentinelAttentionBackend"


def test_the_selection_unpickles_in_a_process_that_has_not_loaded_the_plugin(plugin):
    """EngineCore and workers unpickle the config before they load plugins."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    data = pickle.dumps(AttentionBackendEnum["SENTINEL"])
    code = ("import pickle, sys; from vllm.v1.attention.backends.registry import AttentionBackendEnum as E; "
            "assert pickle.loads(sys.stdin.buffer.read()) is E.CUSTOM; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith(b"ok"), result.stderr[-2000:]


def test_the_platform_routes_only_the_sentinel_selection(plugin):
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.selector import AttentionSelectorConfig

    selector = AttentionSelectorConfig(head_size=64, dtype=torch.float32, kv_cache_dtype="auto", block_size=128)
    assert current_platform.get_attn_backend_cls(AttentionBackendEnum.CUSTOM, selector).endswith("SentinelAttentionBackend")
    assert current_platform.get_attn_backend_cls(None, selector) == AttentionBackendEnum.CPU_ATTN.get_path()


def test_the_kv_spec_maps_to_the_sentinel_manager_and_full_attention_is_untouched(plugin):
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from vllm_sentinel.engine.backend import SentinelAttentionBackend
    from vllm_sentinel.engine.kv_cache_manager import SentinelAttentionManager, SentinelAttentionSpec

    full = FullAttentionSpec(block_size=32, num_kv_heads=2, head_size=64, dtype=torch.float32)
    ours = SentinelAttentionBackend.customize_spec(full)
    assert isinstance(ours, SentinelAttentionSpec) and ours.page_size_bytes == full.page_size_bytes
    assert SentinelAttentionSpec.merge([ours, ours]) == ours
    assert KVCacheSpecRegistry.get_manager_class(ours) is SentinelAttentionManager
    assert KVCacheSpecRegistry.get_manager_class(full) is FullAttentionManager


def cpu_kernel_reader(dtype, block_size: int, heads: int, head_size: int):
    """A `PagedKVReader` for CPU_ATTN's blocks, and the kernel's own cache writer it learned them from."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from vllm_sentinel.engine.backend import PagedKVReader

    isa = _get_attn_isa(dtype, block_size, head_size)

    def write(key, value, cache, slots):
        view = cache.view(cache.shape[0], heads, block_size * 2, head_size)
        key_cache, value_cache = view.chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa,
                                       k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")

    block_shape = (heads, block_size, 2 * head_size)
    return PagedKVReader(write, block_shape, dtype, block_size, heads, head_size), write, block_shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size, heads, head_size", [(32, 2, 64), (128, 1, 128)])
def test_the_kv_reader_learns_the_kernels_layout_and_reads_back_what_it_wrote(dtype, block_size, heads, head_size):
    reader, write, block_shape = cpu_kernel_reader(dtype, block_size, heads, head_size)
    cache = torch.zeros(5, *block_shape, dtype=dtype)
    slots = torch.tensor([3, block_size + 1, 4 * block_size - 1, 2 * block_size, -1])
    keys = torch.randn(5, heads, head_size).to(dtype)
    values = torch.randn(5, heads, head_size).to(dtype)
    write(keys, values, cache, slots)
    got_k, got_v = reader.read(cache, slots[:4])
    assert torch.equal(got_k, keys[:4]) and torch.equal(got_v, values[:4])
    # slot -1 means "do not store": nothing else in the cache was touched
    untouched = torch.ones(5 * block_size, dtype=torch.bool)
    untouched[slots[:4]] = False
    rest_k, rest_v = reader.read(cache, untouched.nonzero().squeeze(1))
    assert not rest_k.any() and not rest_v.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_strided_reads_equal_the_element_index_reads(dtype):
    """The kernel's block layout read as a strided view gives what the learned element index gives
    (slots in any order and repeated, whole blocks), and a layout that is no radix split falls back."""
    from vllm_sentinel.engine.backend import StridedBlockLayout

    block_size, heads, head_size = 32, 2, 64
    reader, _, block_shape = cpu_kernel_reader(dtype, block_size, heads, head_size)
    assert reader.k_layout is not None and reader.v_layout is not None, "the CPU kernel's layout is a radix split"
    cache = torch.randn(6, *block_shape).to(dtype)
    slots = torch.tensor([5, 70, 3, 191, 32, 5, 0, 100])
    blocks = torch.tensor([4, 0, 2])
    strided = reader.read(cache, slots), reader.read_blocks(cache, blocks)
    reader.k_layout = reader.v_layout = None  # the element-index path
    gathered = reader.read(cache, slots), reader.read_blocks(cache, blocks)
    for got, want in zip(strided, gathered):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    shuffled = torch.randperm(block_size * heads * head_size, generator=torch.Generator().manual_seed(0))
    assert StridedBlockLayout.of(shuffled.view(block_size, heads, head_size)) is None


def test_a_tiled_block_layout_reads_back_what_was_written():
    """A kernel that tiles its blocks as AMX does (keys in tiles of 16 slots with dims in pairs,
    values plain) is learned as a multi-digit strided layout, and its slot and block reads give
    what was written, as the element-index path does."""
    from vllm_sentinel.engine.backend import PagedKVReader

    block_size, heads, dim = 32, 2, 64
    slot, head, d = torch.meshgrid(torch.arange(block_size), torch.arange(heads), torch.arange(dim), indexing="ij")
    key_at = head * block_size * dim + (slot // 16) * 16 * dim + (d // 2) * 32 + (slot % 16) * 2 + d % 2
    value_at = heads * block_size * dim + (slot * heads + head) * dim + d

    def write(key, value, cache, slots):
        flat = cache.view(cache.shape[0], -1)
        for row in (slots >= 0).nonzero().squeeze(1).tolist():
            block, offset = divmod(int(slots[row]), block_size)
            flat[block, key_at[offset].reshape(-1)] = key[row].reshape(-1)
            flat[block, value_at[offset].reshape(-1)] = value[row].reshape(-1)

    block_shape = (2 * heads * block_size * dim,)
    reader = PagedKVReader(write, block_shape, torch.float32, block_size, heads, dim)
    assert reader.k_layout is not None and len(reader.k_layout.axes[0]) == 2 and len(reader.k_layout.axes[2]) == 2
    cache = torch.zeros(4, *block_shape)
    slots = torch.tensor([5, 70, 3, 127, 32, 17, 0, 100])
    keys, values = torch.randn(8, heads, dim), torch.randn(8, heads, dim)
    write(keys, values, cache, slots)
    order = torch.tensor([3, 0, 7, 1, 0])
    got_k, got_v = reader.read(cache, slots[order])
    assert torch.equal(got_k, keys[order]) and torch.equal(got_v, values[order])
    whole = reader.read_blocks(cache, torch.tensor([3, 0]))
    reader.k_layout = reader.v_layout = None
    assert all(torch.equal(a, b) for a, b in zip(whole, reader.read_blocks(cache, torch.tensor([3, 0]))))
