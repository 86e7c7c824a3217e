#!/usr/bin/env python3
"""MoA in PyTorch, as a PyTorch user would write it, timed at moa_bench's shapes beside moa.

    python3 bench/compare_torch.py --moa-bench build/bench/bench/moa_bench [--threads 1]

Part 1, the layer: moa_bench's BM_MoA/<shape>_forward[_backward] against PyTorch.
Part 2, the translate trainer's step (moa_bench's BM_TranslateStep_moa/_mha): the demo model
(d_model 128, FFN 256, 2+2 post-LN layers, vocabulary 2000, shared embeddings, dropout 0.1,
label smoothing 0.1, aux losses, clipping at 1, Adam) on 96 source and target sequences of 16
tokens, forward + loss + backward + clipping + Adam, in target tokens/s.

Two PyTorch versions of the layer are timed and the faster one kept at each shape:
  sparse: per expert index_select of its tokens, matmul with its Wq / Wo, index_add into the
          output (the authors' fairseq code does this);
  dense:  every expert's queries for every token in one matmul, the chosen ones gathered (and the
          same on the output side), which wastes E/k times the projection flops but is few ops.
Attention is batched multi-query attention: the T*k expert queries of a sequence against its one
shared K and V. Forward runs under no_grad (evaluation); forward+backward backpropagates
sum(y * g) into every weight and the input, as moa_bench does. One thread unless --threads.

Both sides are timed alike: each measurement is the best of three runs of --min-time / 3 seconds
(moa_bench's repetitions, PyTorch's timed loops), and the two alternate shape by shape, so that a
host that slows down for a while slows both.

Needs Debian's python3-torch with libopenblas0-pthread (otherwise torch uses the reference BLAS
and is about 20x slower: the script refuses to compare then). Not part of the tests.
"""
import argparse
import ctypes
import json
import math
import os
import subprocess
import sys
import time

import torch

# (name, B, T, d_model, E, k, d_h, causal): moa_bench's shapes.
SHAPES = [
    ("toy", 32, 32, 256, 8, 2, 64, False),
    ("base", 8, 128, 512, 8, 8, 128, False),
    ("wide8", 8, 128, 512, 8, 4, 64, False),
    ("wide", 8, 128, 512, 32, 4, 64, False),
    ("wide64", 8, 128, 512, 64, 4, 64, False),
    ("causal", 8, 256, 512, 16, 4, 64, True),
]


class TorchMoA(torch.nn.Module):
    def __init__(self, d_model, experts, top_k, head_dim, dense):
        super().__init__()
        self.experts, self.top_k, self.head_dim, self.dense = experts, top_k, head_dim, dense
        scale = 1.0 / math.sqrt(d_model)
        self.router = torch.nn.Parameter(torch.randn(experts, d_model) * scale)
        self.q_proj = torch.nn.Parameter(torch.randn(experts, head_dim, d_model) * scale)
        self.o_proj = torch.nn.Parameter(torch.randn(experts, d_model, head_dim) / math.sqrt(head_dim))
        self.k_proj = torch.nn.Parameter(torch.randn(head_dim, d_model) * scale)
        self.v_proj = torch.nn.Parameter(torch.randn(head_dim, d_model) * scale)

    def forward(self, x, batch, length, causal, memory=None):
        """x: [B*T, d] queries; memory: [B*S, d] keys and values (None: self-attention)."""
        tokens, d_model = x.shape
        k, d_h, E = self.top_k, self.head_dim, self.experts
        memory = x if memory is None else memory
        logits = x @ self.router.t()
        probabilities = torch.softmax(logits, dim=-1)  # [N, E]
        top_p, top_e = probabilities.topk(k, dim=-1)  # [N, k]
        gates = top_p / top_p.sum(dim=-1, keepdim=True)
        load = torch.zeros(E).index_add_(0, top_e.reshape(-1), torch.ones(tokens * k)) / (tokens * k)
        self.aux = 0.01 * E * (load * probabilities.mean(0)).sum() + 0.001 * (logits.logsumexp(-1) ** 2).mean()
        keys = (memory @ self.k_proj.t()).view(batch, -1, d_h)
        values = (memory @ self.v_proj.t()).view(batch, -1, d_h)
        flat_experts = top_e.reshape(-1)  # [N*k]
        if self.dense:
            all_queries = (x @ self.q_proj.reshape(E * d_h, d_model).t()).view(tokens, E, d_h)
            queries = all_queries.gather(1, top_e.unsqueeze(-1).expand(tokens, k, d_h))  # [N, k, d_h]
        else:
            queries = x.new_zeros(tokens * k, d_h)
            token_of = torch.arange(tokens).repeat_interleave(k)
            for e in range(E):
                slots = (flat_experts == e).nonzero(as_tuple=True)[0]
                if slots.numel() == 0:
                    continue
                queries = queries.index_copy(0, slots, x.index_select(0, token_of[slots]) @ self.q_proj[e].t())
        queries = queries.reshape(batch, length * k, d_h)
        scores = queries @ keys.transpose(1, 2) / math.sqrt(d_h)  # [B, T*k, S]
        if causal:
            position = torch.arange(length)
            mask = position.repeat_interleave(k).unsqueeze(1) < position.unsqueeze(0)
            scores = scores.masked_fill(mask, float("-inf"))
        attended = (torch.softmax(scores, dim=-1) @ values).reshape(tokens * k, d_h)
        weighted = attended * gates.reshape(-1, 1)
        if self.dense:
            # Scatter each slot into its expert's block, then one matmul over all E blocks.
            blocks = x.new_zeros(tokens, k, E, d_h)
            blocks = blocks.scatter(2, top_e.view(tokens, k, 1, 1).expand(tokens, k, 1, d_h),
                                    weighted.view(tokens, k, 1, d_h))
            return blocks.sum(1).reshape(tokens, E * d_h) @ self.o_proj.permute(1, 0, 2).reshape(d_model, E * d_h).t()
        output = x.new_zeros(tokens, d_model)
        token_of = torch.arange(tokens).repeat_interleave(k)
        for e in range(E):
            slots = (flat_experts == e).nonzero(as_tuple=True)[0]
            if slots.numel() == 0:
                continue
            output = output.index_add(0, token_of[slots], weighted.index_select(0, slots) @ self.o_proj[e].t())
        return output


class TorchMHA(torch.nn.Module):
    """Multi-head attention without biases, as moa's (and fairseq's with bias=False)."""

    def __init__(self, d_model, heads, head_dim):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        width = heads * head_dim
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(d_model, width, bias=False) for _ in range(3))
        self.o_proj = torch.nn.Linear(width, d_model, bias=False)
        self.aux = 0.0

    def forward(self, x, batch, length, causal, memory=None):
        memory = x if memory is None else memory
        h, d_h = self.heads, self.head_dim
        q = self.q_proj(x).view(batch, length, h, d_h).transpose(1, 2)
        k = self.k_proj(memory).view(batch, -1, h, d_h).transpose(1, 2)
        v = self.v_proj(memory).view(batch, -1, h, d_h).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d_h)
        if causal:
            scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
        attended = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(batch * length, h * d_h)
        return self.o_proj(attended)


class TorchSeq2Seq(torch.nn.Module):
    """The translate trainer's post-LN Transformer with shared embeddings, as fairseq builds it."""

    def __init__(self, vocab, d_model, ffn, layers, make_attention, dropout):
        super().__init__()
        self.d_model, self.dropout = d_model, dropout
        self.embed = torch.nn.Embedding(vocab, d_model, padding_idx=0)
        self.attentions = torch.nn.ModuleList()
        self.norms = torch.nn.ModuleList()
        self.ffns = torch.nn.ModuleList()
        self.layers = layers
        for _ in range(layers):  # encoder: self-attention, FFN
            self.attentions.append(make_attention())
            self.norms.extend([torch.nn.LayerNorm(d_model), torch.nn.LayerNorm(d_model)])
            self.ffns.append(torch.nn.Sequential(torch.nn.Linear(d_model, ffn), torch.nn.ReLU(), torch.nn.Linear(ffn, d_model)))
        for _ in range(layers):  # decoder: self-attention, cross-attention, FFN
            self.attentions.extend([make_attention(), make_attention()])
            self.norms.extend([torch.nn.LayerNorm(d_model) for _ in range(3)])
            self.ffns.append(torch.nn.Sequential(torch.nn.Linear(d_model, ffn), torch.nn.ReLU(), torch.nn.Linear(ffn, d_model)))

    def positions(self, length):
        half = self.d_model // 2
        frequencies = torch.exp(torch.arange(half) * -(math.log(10000.0) / (half - 1)))
        angles = torch.arange(length).unsqueeze(1) * frequencies.unsqueeze(0)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    def embed_sequence(self, ids):
        batch, length = ids.shape
        x = self.embed(ids) * math.sqrt(self.d_model) + self.positions(length)
        return torch.nn.functional.dropout(x, self.dropout, self.training).reshape(batch * length, self.d_model)

    def forward(self, source, target):
        batch, source_length = source.shape
        target_length = target.shape[1]
        drop = lambda t: torch.nn.functional.dropout(t, self.dropout, self.training)
        x = self.embed_sequence(source)
        attention, norm, ffn = iter(self.attentions), iter(self.norms), iter(self.ffns)
        for _ in range(self.layers):
            x = next(norm)(x + drop(next(attention)(x, batch, source_length, False)))
            x = next(norm)(x + drop(next(ffn)(x)))
        memory, y = x, self.embed_sequence(target)
        for _ in range(self.layers):
            y = next(norm)(y + drop(next(attention)(y, batch, target_length, True)))
            y = next(norm)(y + drop(next(attention)(y, batch, target_length, False, memory)))
            y = next(norm)(y + drop(next(ffn)(y)))
        aux = sum(a.aux for a in self.attentions)
        return y @ self.embed.weight.t(), aux


def torch_translate_tokens_per_second(kind, min_seconds):
    torch.manual_seed(0)
    batch, length, vocab = 96, 16, 2000
    if kind == "moa":
        make_attention = lambda: TorchMoA(128, 8, 4, 48, dense=False)
    else:
        make_attention = lambda: TorchMHA(128, 4, 32)
    model = TorchSeq2Seq(vocab, 128, 256, 2, make_attention, 0.1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9)
    source = torch.randint(4, vocab, (batch, length))
    target_input = torch.randint(4, vocab, (batch, length))
    target_output = torch.randint(4, vocab, (batch * length,))

    def step():
        optimizer.zero_grad(set_to_none=True)
        logits, aux = model(source, target_input)
        loss = torch.nn.functional.cross_entropy(logits, target_output, ignore_index=0, label_smoothing=0.1) + aux
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return batch * length / best_time(step, min_seconds)


REPEATS = 3  # runs per measurement, the best kept


def best_time(function, min_seconds=1.0):
    function()
    best = float("inf")
    for _ in range(REPEATS):
        count, start = 0, time.perf_counter()
        while True:
            function()
            count += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds / REPEATS:
                break
        best = min(best, elapsed / count)
    return best


def torch_times(shape, min_seconds):
    name, B, T, d, E, k, d_h, causal = shape
    torch.manual_seed(0)
    x = torch.randn(B * T, d)
    g = torch.randn(B * T, d)
    result = {}
    for dense in (False, True):
        layer = TorchMoA(d, E, k, d_h, dense)
        with torch.no_grad():
            forward = best_time(lambda: layer(x, B, T, causal), min_seconds)

        def step():
            x_grad = x.clone().requires_grad_(True)
            layer.zero_grad(set_to_none=True)
            (layer(x_grad, B, T, causal) * g).sum().backward()

        both = best_time(step, min_seconds)
        variant = "dense" if dense else "sparse"
        for key, value in (("forward", forward), ("forward_backward", both)):
            if key not in result or value < result[key][0]:
                result[key] = (value, variant)
    return result


def moa_times(moa_bench, threads, min_seconds, benchmark_filter):
    """Seconds per iteration of the benchmarks matching the filter, by name (BM_MoA/ dropped): the
    best of REPEATS repetitions of min_seconds / REPEATS each, as best_time does for PyTorch."""
    command = [moa_bench, f"--threads={threads}", f"--benchmark_filter={benchmark_filter}",
               "--benchmark_format=json", f"--benchmark_min_time={min_seconds / REPEATS}",
               f"--benchmark_repetitions={REPEATS}"]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    times = {}
    for entry in json.loads(output)["benchmarks"]:
        if entry.get("run_type") != "iteration":
            continue  # the repetitions' mean, median and deviation
        scale = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[entry["time_unit"]]
        name = entry["run_name"].replace("BM_MoA/", "")
        times[name] = min(times.get(name, float("inf")), entry["real_time"] * scale)
    if not times:
        sys.exit(f"{moa_bench} ran no benchmark matching {benchmark_filter}")
    return times


def limit_blas_threads(threads):
    """torch.set_num_threads does not reach OpenBLAS, which otherwise takes every core: set it there
    too, then check on a product that PyTorch's CPU time is no more than `threads` times its wall time."""
    with open("/proc/self/maps") as maps:
        libraries = {line.split()[-1] for line in maps if "blas" in line and line.rstrip().endswith(".so.3")
                     or "libopenblas" in line}
    for library in libraries:
        handle = ctypes.CDLL(library)
        if hasattr(handle, "openblas_set_num_threads"):
            handle.openblas_set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(10):
        a @ b
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if cpu > (threads + 0.25) * wall:
        sys.exit(f"PyTorch used {cpu / wall:.1f} cores for a matrix product, not {threads}: its BLAS ignores "
                 "the thread count (set OPENBLAS_NUM_THREADS)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--moa-bench", default="build/bench/bench/moa_bench", help="path of moa_bench")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds per measurement")
    arguments = parser.parse_args()
    if arguments.threads < 1:
        sys.exit("--threads must be at least 1")
    if arguments.min_time <= 0:
        sys.exit(f"--min-time must be positive, got {arguments.min_time}")
    if not os.access(arguments.moa_bench, os.X_OK):
        sys.exit(f"no moa_bench at {arguments.moa_bench}: build it with `cmake --workflow --preset bench`, "
                 "or pass --moa-bench")
    config = torch.__config__.show()
    if "BLAS_INFO=generic" in config:
        try:
            blas = subprocess.run(["update-alternatives", "--query", "libblas.so.3-x86_64-linux-gnu"],
                                  capture_output=True, text=True).stdout
        except OSError:
            blas = ""
        if "openblas" not in blas:
            sys.exit("torch would use the reference BLAS (20x slower): install libopenblas0-pthread first")
    torch.set_num_threads(arguments.threads)
    limit_blas_threads(arguments.threads)
    print(f"torch {torch.__version__}, {arguments.threads} thread(s); times in ms, speedup = PyTorch / moa")
    print(f"{'shape':8} {'moa fwd':>9} {'torch fwd':>10} {'speedup':>8} {'moa f+b':>9} {'torch f+b':>10} {'speedup':>8}"
          f"  torch variants")
    for shape in SHAPES:
        name = shape[0]
        ours = moa_times(arguments.moa_bench, arguments.threads, arguments.min_time, f"^BM_MoA/{name}_forward(_backward)?$")
        theirs = torch_times(shape, arguments.min_time)
        ours_forward, ours_both = ours[f"{name}_forward"], ours[f"{name}_forward_backward"]
        torch_forward, forward_variant = theirs["forward"]
        torch_both, both_variant = theirs["forward_backward"]
        print(f"{name:8} {ours_forward * 1e3:9.2f} {torch_forward * 1e3:10.2f} {torch_forward / ours_forward:8.2f}"
              f" {ours_both * 1e3:9.2f} {torch_both * 1e3:10.2f} {torch_both / ours_both:8.2f}"
              f"  {forward_variant}/{both_variant}", flush=True)
    print("\ntranslate trainer step (demo model, 96 x 16 target tokens), target tokens/s")
    print(f"{'model':8} {'moa':>9} {'torch':>10} {'speedup':>8}")
    for kind in ("moa", "mha"):
        step = moa_times(arguments.moa_bench, arguments.threads, arguments.min_time, f"^BM_TranslateStep_{kind}$")
        ours = 96 * 16 / step[f"BM_TranslateStep_{kind}"]
        theirs = torch_translate_tokens_per_second(kind, arguments.min_time)
        print(f"{kind:8} {ours:9.0f} {theirs:10.0f} {ours / theirs:8.2f}", flush=True)


if __name__ == "__main__":
    main()
