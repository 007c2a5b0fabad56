# Loads that run on the nodes of a benchmark cluster (CLUSTER in bench/workloads/cluster.exs
# compiles this file and loads the modules onto every node).

defmodule Kuma.Bench.ClusterLoad do
  @moduledoc false

  @doc """
  The W1 shape from this node: `writers` processes share `calls` appends of `batch`
  (a list of events) to random entities among `entities`. Returns {microseconds, events}.
  """
  def w1(store, writers, calls, batch, entities, seed) do
    {micros, counts} =
      :timer.tc(fn ->
        1..writers
        |> Enum.map(fn w ->
          Task.async(fn ->
            :rand.seed(:exsss, {seed, w, 31})

            for _ <- 1..Range.size(w..calls//writers)//1, reduce: 0 do
              n ->
                {:ok, _} = Kuma.append(store, "user_#{:rand.uniform(entities)}", batch, timeout: 60_000)
                n + length(batch)
            end
          end)
        end)
        |> Task.await_many(:infinity)
      end)

    {micros, Enum.sum(counts)}
  end

  @doc """
  The W1 shape until stopped (`steady_stop/1`): `writers` processes append `batch` to random
  entities, each at most one append every `interval_ms` (0: as fast as it can). The OS time
  (ms) of every acknowledged append is what `steady_stop/1` returns.
  """
  def steady_start(store, writers, batch, entities, seed, interval_ms \\ 0) do
    spawn(fn ->
      flag = :atomics.new(1, [])

      tasks =
        for w <- 1..writers do
          Task.async(fn ->
            :rand.seed(:exsss, {seed, w, 47})
            # Paced writers start spread over one interval.
            if interval_ms > 0, do: Process.sleep(:rand.uniform(max(round(interval_ms), 1)))
            steady_loop(store, batch, entities, flag, {interval_ms, System.monotonic_time(:microsecond)}, [])
          end)
        end

      receive do
        {:stop, from, ref} ->
          :atomics.put(flag, 1, 1)
          send(from, {ref, tasks |> Task.await_many(:infinity) |> Enum.concat()})
      end
    end)
  end

  def steady_stop(pid) do
    ref = make_ref()
    send(pid, {:stop, self(), ref})

    receive do
      {^ref, acks} -> acks
    after
      120_000 -> []
    end
  end

  defp steady_loop(store, batch, entities, flag, pace, acks) do
    if :atomics.get(flag, 1) == 1 do
      acks
    else
      pace = wait_turn(pace)

      case Kuma.append(store, "user_#{:rand.uniform(entities)}", batch, timeout: 60_000) do
        {:ok, _} -> steady_loop(store, batch, entities, flag, pace, [System.os_time(:millisecond) | acks])
        _ -> steady_loop(store, batch, entities, flag, pace, acks)
      end
    end
  end

  # A paced writer's next turn: one interval after the last; a writer that fell behind
  # (the cluster stalled) starts again from now, rather than bursting to catch up.
  defp wait_turn({interval_ms, _due} = pace) when interval_ms == 0, do: pace

  defp wait_turn({interval_ms, due}) do
    now = System.monotonic_time(:microsecond)
    if due > now, do: Process.sleep(div(due - now, 1000))
    {interval_ms, max(due, System.monotonic_time(:microsecond)) + round(interval_ms * 1000)}
  end

  @doc "Bytes of this node's shard files (with their WAL)."
  def shard_bytes(dir) do
    Path.wildcard(Path.join([dir, "shards", "*"])) |> Enum.map(&File.stat!(&1).size) |> Enum.sum()
  end

  @doc """
  The W2 shape from this node: one process per entity id in `ids` runs single-event
  commands for `seconds`. Returns {events, latencies in µs}.
  """
  def w2(store, ids, event, seconds) do
    results = per_entity(store, ids, seconds, &Kuma.execute(&1, {:deposit, event}, timeout: 60_000))
    {Enum.sum(for({_, n, _} <- results, do: n)), for({_, _, lat} <- results, t <- lat, do: t)}
  end

  @doc """
  Reads of entity state from this node: one process per id in `ids` calls `Kuma.fetch/1`
  in a loop for `seconds`. Returns `{reads, latencies in µs of entities whose shard this
  node leads, latencies of the others (sent to their leader)}`.
  """
  def reads(store, ids, seconds) do
    results = per_entity(store, ids, seconds, &Kuma.fetch/1)
    local = for {id, _, lat} <- results, leads?(store, id), t <- lat, do: t
    remote = for {id, _, lat} <- results, not leads?(store, id), t <- lat, do: t
    {Enum.sum(for({_, n, _} <- results, do: n)), local, remote}
  end

  # One process per id runs `call` on its entity (loaded first) until `seconds` are up:
  # [{id, calls, latencies in µs}]. A call must answer {:ok, _}.
  defp per_entity(store, ids, seconds, call) do
    deadline = System.monotonic_time(:millisecond) + seconds * 1000

    ids
    |> Enum.map(fn id ->
      Task.async(fn ->
        entity = Kuma.entity(store, Kuma.Bench.ClusterAccount, id)
        {:ok, _} = Kuma.fetch(entity)
        {n, lat} = loop(fn -> {:ok, _} = call.(entity) end, deadline, 0, [])
        {id, n, lat}
      end)
    end)
    |> Task.await_many(:infinity)
  end

  defp loop(call, deadline, n, lat) do
    if System.monotonic_time(:millisecond) >= deadline do
      {n, lat}
    else
      t0 = System.monotonic_time(:microsecond)
      call.()
      loop(call, deadline, n + 1, [System.monotonic_time(:microsecond) - t0 | lat])
    end
  end

  @doc """
  Appends to `id` without pause until told to stop; returns `{issued, acknowledged}` OS
  times (ms) of the acknowledged appends (what a failover is measured by).
  """
  def probe(store, id) do
    spawn(fn -> probe_loop(store, id, []) end)
  end

  def stop_probe(pid) do
    ref = make_ref()
    send(pid, {:stop, self(), ref})

    receive do
      {^ref, acks} -> acks
    after
      30_000 -> []
    end
  end

  defp probe_loop(store, id, acks) do
    receive do
      {:stop, from, ref} -> send(from, {ref, Enum.reverse(acks)})
    after
      0 ->
        issued = System.os_time(:millisecond)

        case Kuma.append(store, id, {:probe, 1}, timeout: 5_000) do
          {:ok, _} ->
            probe_loop(store, id, [{issued, System.os_time(:millisecond)} | acks])

          error ->
            if System.get_env("KUMA_PROBE_DEBUG"),
              do: IO.inspect({issued, System.os_time(:millisecond), error}, label: "probe")

            probe_loop(store, id, acks)
        end
    end
  end

  @doc "The shard of an entity id."
  def shard_of(store, id) do
    {:ok, s} = Kuma.Store.lookup(store)
    Kuma.Cluster.Route.shard(s, id)
  end

  @doc "Whether this node leads `id`'s shard now (its member is the leader and serves it)."
  def leads?(store, id) do
    {:ok, s} = Kuma.Store.lookup(store)
    Kuma.Cluster.Shards.leader?(s, Kuma.Cluster.Route.shard(s, id))
  end

  @doc "The node leading `id`'s shard now, as Raft says (not a cached route)."
  def leader_of(store, id) do
    {:ok, s} = Kuma.Store.lookup(store)
    group = Kuma.Cluster.shard_group(s.cluster, Kuma.Cluster.Route.shard(s, id))

    case Kuma.Cluster.Consensus.engine().leader(group, node(), 5_000) do
      {:ok, node} -> node
      _ -> Process.sleep(200) && leader_of(store, id)
    end
  end
end

defmodule Kuma.Bench.ClusterAccount do
  @moduledoc false
  @behaviour Kuma.Aggregate
  def init(_id), do: 0
  def handle(_count, {:deposit, event}), do: {:ok, [event]}
  def apply(count, _event), do: count + 1
end
