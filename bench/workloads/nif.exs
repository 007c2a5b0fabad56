# NIF: how long an append call holds its scheduler.

defmodule Kuma.Bench.NifCost do
  @moduledoc false
  alias Kuma.Bench.Payload
  # How long an append NIF call holds its scheduler, by size, on the normal and the dirty
  # CPU path. Measured against a closed store so only decoding and copying are timed
  # (queueing adds a channel send).

  def run(quick) do
    dir = Path.join(System.tmp_dir!(), "kuma_bench_nif_#{System.unique_integer([:positive])}")
    {:ok, store} = Kuma.start(name: :bench_nif, data_dir: dir, shards: 1, master_key: :crypto.strong_rand_bytes(32))
    :ok = Kuma.stop(store)
    event = Payload.event(200)
    reps = if quick, do: 200, else: 1000

    rows =
      for n <- [1, 10, 100, 200, 500, 1000] do
        {:ok, %{encoded: encoded, bytes: bytes}} = Kuma.Codec.encode_events(List.duplicate(event, n), nil)
        normal = time(reps, fn ref -> Kuma.Native.write_append(store.native, ref, "e", nil, encoded) end)
        dirty = time(reps, fn ref -> Kuma.Native.write_append_dirty(store.native, ref, "e", nil, encoded) end)

        IO.puts(
          "  #{n} events (#{bytes} B): normal p50 #{normal.p50} us p99 #{normal.p99} us, dirty p50 #{dirty.p50} us"
        )

        %{events: n, bytes: bytes, normal: normal, dirty: dirty}
      end

    File.rm_rf!(dir)
    %{rows: rows}
  end

  defp time(reps, fun) do
    sorted =
      for _ <- 1..reps do
        ref = make_ref()
        t0 = System.monotonic_time(:nanosecond)
        {:error, :store_closed} = fun.(ref)
        System.monotonic_time(:nanosecond) - t0
      end
      |> Enum.sort()

    %{p50: div(Enum.at(sorted, div(reps, 2)), 1000), p99: div(Enum.at(sorted, div(reps * 99, 100)), 1000)}
  end
end
