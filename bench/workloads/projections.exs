# PROJ: projections under load and catch-up speed (issue 5). See docs/benchmarks.md.

defmodule Kuma.Bench.Proj.LagProbe do
  @moduledoc false
  # Records, for every 20th event, how long after its commit timestamp it was handled.
  @behaviour Kuma.Projection

  @impl true
  def init(table), do: {:ok, {table, 0}}

  @impl true
  def handle_event(%Kuma.Envelope{timestamp: ts}, {table, n}) do
    if rem(n, 20) == 0, do: :ets.insert(table, {n, System.os_time(:microsecond) - ts})
    {:ok, {table, n + 1}}
  end
end

defmodule Kuma.Bench.Proj.Noop do
  @moduledoc false
  # Raw catch-up: every event read and decoded, nothing done with it.
  @behaviour Kuma.Projection

  @impl true
  def init(_), do: {:ok, 0}

  @impl true
  def handle_event(_envelope, n), do: {:ok, n + 1}
end

defmodule Kuma.Bench.Proj.Totals do
  @moduledoc false
  # A typical read model: one upsert per event (events per entity).
  use Kuma.ReadModel

  @impl true
  def schema, do: ["CREATE TABLE totals (entity_id TEXT PRIMARY KEY, events INTEGER NOT NULL)"]

  @impl true
  def handle_event(%Kuma.Envelope{entity_id: id}) do
    {"INSERT INTO totals VALUES (?1, 1) ON CONFLICT(entity_id) DO UPDATE SET events = events + 1", [id]}
  end
end

defmodule Kuma.Bench.Proj do
  @moduledoc false
  alias Kuma.Bench.{Progress, Table}
  alias Kuma.Bench.Proj.{LagProbe, Noop, Totals}

  @lag_target_ms 1_000
  @replay_target 200_000
  @raw_target 500_000

  def run(quick) do
    p = Kuma.Bench.W1.params(quick)

    IO.puts(
      "PROJ: W1 (#{Progress.fmt(p.events)} events, #{p.writers} writers, appends of #{p.batch}, #{p.shards} shards, " <>
        "encrypted) with and without two projections and a subscriber; then catch-up replays"
    )

    dir = Path.join(System.tmp_dir!(), "kuma_bench_proj_#{System.unique_integer([:positive])}")
    name = :bench_proj

    {:ok, store} = Kuma.start(name: name, data_dir: dir, shards: p.shards, master_key: :crypto.strong_rand_bytes(32))

    try do
      IO.puts(" warm-up (20,000 events) ...")
      w1(store, %{p | events: 20_000}, "warm-up")
      IO.puts(" W1 alone ...")
      alone = w1(store, p, "W1 alone")

      IO.puts(" W1 with the lag probe, a read model (one upsert per event) and a subscriber attached ...")
      lags = :ets.new(:lags, [:public, :set])
      {:ok, _} = Kuma.Projection.start(store, LagProbe, name: :bench_lag, args: lags, checkpoint: :memory)
      {:ok, s} = Kuma.Store.lookup(store)
      {:ok, _} = Kuma.ReadModel.start(store, Totals, name: :bench_totals, path: Path.join(dir, "totals-live.sqlite"))
      Kuma.Projection.wait_for(:bench_lag, Kuma.Feed.heads(s), 600_000)
      Kuma.Projection.wait_for(:bench_totals, Kuma.Feed.heads(s), 600_000)
      :ets.delete_all_objects(lags)
      subscriber = spawn_subscriber(store)
      attached = w1(store, p, "W1 + 2 projections + subscriber")
      t_end = System.monotonic_time(:millisecond)
      :ok = Kuma.Projection.wait_for(:bench_lag, Kuma.Feed.heads(s), 600_000)
      probe_done_ms = System.monotonic_time(:millisecond) - t_end
      :ok = Kuma.Projection.wait_for(:bench_totals, Kuma.Feed.heads(s), 600_000)
      totals_done_ms = System.monotonic_time(:millisecond) - t_end
      {received, lagged} = subscriber_count(subscriber, p.events, 120_000)
      subscriber_done_ms = System.monotonic_time(:millisecond) - t_end
      lag_values = :ets.tab2list(lags) |> Enum.map(&elem(&1, 1))
      lag = Table.percentiles(lag_values, [0.5, 0.99, 1.0])
      Kuma.Projection.stop(:bench_lag)
      Kuma.Projection.stop(:bench_totals)

      drop = Float.round((1 - attached.events_per_sec / alone.events_per_sec) * 100, 1)
      total = p.events * 2 + 20_000

      IO.puts(" catch-up: raw shard reads (decrypt, no decode) of #{Progress.fmt(total)} events ...")
      raw_nif = raw_read(s, p.shards)

      IO.puts(" catch-up: a projection that decodes every event and does nothing ...")

      noop =
        replay(
          s,
          fn -> Kuma.Projection.start(store, Noop, name: :bench_noop, checkpoint: :memory, batch_size: 2_000) end,
          :bench_noop
        )

      IO.puts(" catch-up: the read model (one upsert per event) from empty ...")
      path = Path.join(dir, "totals-replay.sqlite")

      rm =
        replay(
          s,
          fn -> Kuma.ReadModel.start(store, Totals, name: :bench_replay, path: path, batch_size: 2_000) end,
          :bench_replay
        )

      IO.puts("\nPROJ results")
      IO.puts("  W1 alone:                 #{Progress.fmt(alone.events_per_sec)} ev/s")
      IO.puts("  W1 with 2 projections + 1 subscriber: #{Progress.fmt(attached.events_per_sec)} ev/s (drop #{drop}%)")

      IO.puts(
        "  lag of the probe projection during that run: p50 #{ms(lag[0.5])} ms, p99 #{ms(lag[0.99])} ms, max #{ms(lag[1.0])} ms " <>
          "(target p99 <= #{@lag_target_ms} ms: #{Table.verdict(lag[0.99] <= @lag_target_ms * 1000)})"
      )

      IO.puts(
        "  caught up after the writes ended: probe #{probe_done_ms} ms, read model #{totals_done_ms} ms, " <>
          "subscriber #{subscriber_done_ms} ms (#{Progress.fmt(received)} of #{Progress.fmt(p.events)} events, #{lagged} :kuma_lagged notices)"
      )

      IO.puts("  raw catch-up (NIF reads, decrypted, not decoded): #{Progress.fmt(raw_nif)} ev/s")

      IO.puts(
        "  raw catch-up (projection, decoded, no output):    #{Progress.fmt(noop)} ev/s (target >= #{Progress.fmt(@raw_target)}: #{Table.verdict(noop >= @raw_target)})"
      )

      IO.puts(
        "  read model replay (one upsert per event):         #{Progress.fmt(rm)} ev/s (target >= #{Progress.fmt(@replay_target)}: #{Table.verdict(rm >= @replay_target)})\n"
      )

      %{
        params: p,
        w1_alone: alone,
        w1_attached: attached,
        drop_pct: drop,
        lag_ms: %{p50: ms(lag[0.5]), p99: ms(lag[0.99]), max: ms(lag[1.0])},
        caught_up_after_writes_ms: %{probe: probe_done_ms, read_model: totals_done_ms, subscriber: subscriber_done_ms},
        subscriber_events: received,
        subscriber_lagged_notices: lagged,
        raw_nif_events_per_sec: raw_nif,
        raw_projection_events_per_sec: noop,
        read_model_replay_events_per_sec: rm
      }
    after
      Kuma.stop(store)
      File.rm_rf!(dir)
    end
  end

  defp ms(nil), do: nil
  defp ms(us), do: Float.round(us / 1000, 1)

  defp w1(store, p, label) do
    micros = Kuma.Bench.W1.drive(store, p, label)

    %{
      events: p.events,
      seconds: Float.round(micros / 1_000_000, 3),
      events_per_sec: round(p.events * 1_000_000 / micros)
    }
  end

  defp spawn_subscriber(store) do
    parent = self()

    spawn(fn ->
      {:ok, _} = Kuma.subscribe(store)
      send(parent, :subscribed)
      count_loop(0, 0)
    end)
    |> tap(fn _ -> receive do: (:subscribed -> :ok) end)
  end

  defp count_loop(n, lagged) do
    receive do
      {:kuma_event, _} ->
        count_loop(n + 1, lagged)

      {:kuma_lagged, _} ->
        count_loop(n, lagged + 1)

      {:count, from} ->
        send(from, {:count, n, lagged})
        count_loop(n, lagged)
    end
  end

  # Waits (up to `timeout` ms) until the subscriber has received `expected` events, then
  # stops it: a lagging subscription catches up from storage on its own, so it gets every
  # event, later. Returns {events received, :kuma_lagged notices}.
  defp subscriber_count(pid, expected, timeout) do
    send(pid, {:count, self()})
    {n, lagged} = receive do: ({:count, n, lagged} -> {n, lagged})

    if n >= expected or timeout <= 0 do
      Process.exit(pid, :kill)
      {n, lagged}
    else
      Process.sleep(100)
      subscriber_count(pid, expected, timeout - 100)
    end
  end

  defp raw_read(s, shards) do
    {micros, n} =
      :timer.tc(fn ->
        Enum.reduce(0..(shards - 1), 0, fn shard, acc -> acc + read_all(s, shard, 0, 0) end)
      end)

    round(n * 1_000_000 / micros)
  end

  defp read_all(s, shard, after_pos, n) do
    case Kuma.Query.read_shard(s, shard, after_pos, %Kuma.Query{}, 2_000) do
      {:ok, {[], _, _}} -> n
      {:ok, {events, searched, _hash}} -> read_all(s, shard, searched, n + length(events))
    end
  end

  defp replay(s, start, name) do
    heads = Kuma.Feed.heads(s)
    total = Enum.sum(Map.values(heads))
    t0 = System.monotonic_time(:microsecond)
    {:ok, _} = start.()
    :ok = Kuma.Projection.wait_for(name, heads, 600_000)
    micros = System.monotonic_time(:microsecond) - t0
    Kuma.Projection.stop(name)
    round(total * 1_000_000 / micros)
  end
end
