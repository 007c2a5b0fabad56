defmodule Kuma.Metrics do
  @moduledoc """
  What a running store reports about itself: counters fed by Kuma's telemetry events
  (`Kuma.Telemetry`) and gauges read when asked, rendered in the Prometheus text format
  (`prometheus/1`) and as the JSON the live monitor page polls. Served by `Kuma.HTTP`
  when the store is started with `http: [port: ...]`; `snapshot/1` works for any store
  whose metrics are on.

  | metric | type | labels | what |
  | --- | --- | --- | --- |
  | `kuma_info` | gauge (1) | `store`, `store_id`, `mode` | the store (`mode`: `single` or `cluster`) |
  | `kuma_uptime_seconds` | gauge | `store` | since the store opened |
  | `kuma_appends_total` | counter | `store` | appends committed (a pipelined batch of an entity counts once; each entry of `Kuma.append_batch/3` once) |
  | `kuma_append_errors_total` | counter | `store` | appends refused or failed |
  | `kuma_events_appended_total` | counter | `store` | events committed |
  | `kuma_bytes_appended_total` | counter | `store` | encoded event bytes committed |
  | `kuma_append_duration_seconds` | histogram | `store` | from the call to the commit's answer (an `append_batch/3` is one observation) |
  | `kuma_executes_total` | counter | `store` | commands decided by aggregates |
  | `kuma_entity_loads_total` | counter | `store` | entity processes started from storage |
  | `kuma_entity_passivations_total` | counter | `store` | idle entities stopped |
  | `kuma_entities_live` | gauge | `store` | entity processes running |
  | `kuma_snapshots_total` | counter | `store` | snapshots written (entities' and frameworks') |
  | `kuma_erasures_total` | counter | `store` | entities erased |
  | `kuma_shard_position` | gauge | `store`, `shard` | last committed position |
  | `kuma_shard_transactions_total` | counter | `store`, `shard` | group commits |
  | `kuma_writer_queue_depth` | gauge | `store`, `writer` | commands waiting for a writer thread |
  | `kuma_global_position` | gauge | `store` | end of the store-wide order (single node) |
  | `kuma_projection_lag` | gauge | `store`, `projection` | positions behind the commits |
  | `kuma_projection_events_total` | counter | `store`, `projection` | events handled |
  | `kuma_beam_memory_bytes` | gauge | `kind` | `:erlang.memory/0` |
  | `kuma_native_memory_bytes` | gauge | `kind` | `sqlite` (all of SQLite in this OS process), `tail` (the store's live tails) |
  | `process_resident_memory_bytes` | gauge | | the OS process's resident memory |
  | `kuma_cluster_nodes` | gauge | `store`, `state` | cluster mode: nodes by state |
  | `kuma_cluster_shards_led` | gauge | `store` | cluster mode: shards this node leads |

  Counters start at zero when the store starts. Entity ids never appear in labels.
  """

  alias Kuma.{Native, Position, Store}

  @counters [
    :appends,
    :append_errors,
    :events,
    :bytes,
    :executes,
    :loads,
    :passivations,
    :snapshots,
    :erasures,
    :duration_sum_us
  ]
  # Upper bounds of the append latency histogram, in µs (+Inf follows).
  @buckets_us [100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000, 5_000_000]
  @slot Map.new(Enum.with_index(@counters, 1))
  @first_bucket length(@counters) + 1
  @size length(@counters) + length(@buckets_us) + 1
  @handler "kuma.metrics"

  @doc false
  # Turns metrics on for `store` (called by the process that serves them, which owns the
  # table of projection counters): from now on its telemetry events are counted.
  @spec enable(atom()) :: :ok
  def enable(store) do
    projections = :ets.new(:kuma_metrics_projections, [:set, :public, write_concurrency: true])
    :persistent_term.put(key(store), {:counters.new(@size, [:write_concurrency]), projections})
    _ = Kuma.Telemetry.attach(@handler, Kuma.Telemetry.events(), &__MODULE__.handle/4, nil)
    :ok
  end

  @doc false
  @spec disable(atom()) :: :ok
  def disable(store) do
    :persistent_term.erase(key(store))
    if not Enum.any?(:persistent_term.get(), &match?({{__MODULE__, _}, _}, &1)), do: Kuma.Telemetry.detach(@handler)
    :ok
  end

  defp key(store), do: {__MODULE__, store}

  @doc false
  # The telemetry handler: counts an event of a store whose metrics are on.
  def handle(event, measurements, %{store: store} = metadata, _config) do
    case :persistent_term.get(key(store), nil) do
      nil -> :ok
      {counters, projections} -> count(event, measurements, metadata, counters, projections)
    end
  end

  def handle(_event, _measurements, _metadata, _config), do: :ok

  defp count([:kuma, :append, :stop], m, _meta, c, _p), do: appended(c, 1, 0, m)
  defp count([:kuma, :append, :exception], _m, _meta, c, _p), do: :counters.add(c, @slot.append_errors, 1)

  # A batch over many entities: each committed entry is an append; the batch's latency is
  # one observation.
  defp count([:kuma, :append_batch, :stop], m, _meta, c, _p), do: appended(c, m.entries, m.failed, m)
  defp count([:kuma, :execute, :stop], m, _meta, c, _p), do: :counters.add(c, @slot.executes, m.writes)
  defp count([:kuma, :load, :stop], _m, _meta, c, _p), do: :counters.add(c, @slot.loads, 1)
  defp count([:kuma, :snapshot, :stop], _m, _meta, c, _p), do: :counters.add(c, @slot.snapshots, 1)
  defp count([:kuma, :erase, :stop], _m, _meta, c, _p), do: :counters.add(c, @slot.erasures, 1)
  defp count([:kuma, :entity, :passivate], _m, _meta, c, _p), do: :counters.add(c, @slot.passivations, 1)

  defp count([:kuma, :projection, :batch], m, meta, _c, p) do
    :ets.update_counter(p, meta.name, {2, m.events}, {meta.name, 0})
    :ok
  end

  defp appended(c, appends, failed, m) do
    us = System.convert_time_unit(m.duration, :native, :microsecond)
    :counters.add(c, @slot.appends, appends)
    :counters.add(c, @slot.append_errors, failed)
    :counters.add(c, @slot.events, m.events)
    :counters.add(c, @slot.bytes, m.bytes)
    :counters.add(c, @slot.duration_sum_us, us)
    :counters.add(c, @first_bucket + bucket(us, @buckets_us, 0), 1)
  end

  defp bucket(_us, [], i), do: i
  defp bucket(us, [bound | _], i) when us <= bound, do: i
  defp bucket(us, [_ | rest], i), do: bucket(us, rest, i + 1)

  @doc """
  Every metric of `store` now, as a map (what `prometheus/1` renders). `{:error,
  :metrics_off}` if the store was not started with `http:`.
  """
  @spec snapshot(Kuma.store()) :: {:ok, map()} | {:error, term()}
  def snapshot(store) do
    with {:ok, s} <- Store.lookup(store) do
      case :persistent_term.get(key(s.name), nil) do
        nil -> {:error, :metrics_off}
        {counters, projections} -> {:ok, collect(s, counters, projections)}
      end
    end
  end

  defp collect(s, c, projections) do
    stats = Native.store_stats(s.native)
    load = Native.store_load(s.native)
    positions = Native.store_commit_positions(s.native)
    counts = Map.new(@slot, fn {name, i} -> {name, :counters.get(c, i)} end)
    buckets = for i <- 0..length(@buckets_us), do: :counters.get(c, @first_bucket + i)

    %{
      store: s.name,
      store_id: s.store_id,
      mode: if(s.cluster, do: :cluster, else: :single),
      uptime_seconds: (System.monotonic_time(:millisecond) - s.started_at) / 1000,
      counters: counts,
      append_latency: %{bounds_us: @buckets_us, counts: buckets, sum_us: counts.duration_sum_us},
      entities_live: :ets.info(s.entities, :size),
      shards:
        for {{pos, st}, shard} <- Enum.with_index(Enum.zip(positions, stats)) do
          %{
            shard: shard,
            position: pos,
            transactions: st.transactions,
            events: st.events,
            writer: Enum.at(load.shard_threads, shard)
          }
        end,
      writer_queues: load.queues,
      global_position: global_position(s),
      projections: projections(s, projections, Map.new(Enum.with_index(positions), fn {p, i} -> {i, p} end)),
      memory: %{
        beam: Map.new(:erlang.memory()),
        native: %{sqlite: load.sqlite_bytes, tail: load.tail_bytes},
        resident: resident_bytes()
      },
      cluster: cluster(s)
    }
  end

  defp global_position(%Store{cluster: nil} = s), do: Native.store_global_position(s.native)
  defp global_position(_s), do: nil

  # Every projection of this store running on this node: its lag against the commits now.
  defp projections(s, counters, heads) do
    spec = [{{{:projection, :"$1"}, :_, %{store: s.name, kind: :"$2"}}, [], [{{:"$1", :"$2"}}]}]

    for {name, kind} <- Registry.select(Kuma.Registry, spec) do
      # A projection busy with a long batch is shown as such rather than holding the scrape.
      status =
        case Kuma.Projection.status(name, 1_000) do
          {:ok, status} -> status
          {:error, _} -> %{}
        end

      lag = if status[:position], do: Position.behind(status.position, heads)

      %{
        name: inspect(name),
        kind: kind,
        status: status[:status] || :busy,
        lag: lag,
        handled:
          case :ets.lookup(counters, name) do
            [{_, n}] -> n
            [] -> 0
          end
      }
    end
  rescue
    ArgumentError -> []
  end

  defp cluster(%Store{cluster: nil}), do: nil

  defp cluster(s) do
    case Kuma.cluster_info(s.name) do
      {:ok, info} ->
        %{
          nodes: info.nodes |> Enum.frequencies_by(fn {_n, n} -> n.state end),
          reachable: Enum.count(info.nodes, fn {_n, n} -> n.reachable end),
          shards_led: Enum.count(info.shards, &(&1.leader == node()))
        }

      _ ->
        nil
    end
  catch
    :exit, _ -> nil
  end

  defp resident_bytes do
    with {:ok, statm} <- File.read("/proc/self/statm"),
         [_size, resident | _] <- String.split(statm),
         {pages, _} <- Integer.parse(resident) do
      pages * 4096
    else
      _ -> nil
    end
  end

  # -- the Prometheus text format ------------------------------------------------------------

  @doc """
  `snapshot` in the Prometheus text exposition format (version 0.0.4).
  """
  @spec prometheus(map()) :: iodata()
  def prometheus(m) do
    st = [store: m.store]
    c = m.counters

    [
      metric("kuma_info", :gauge, "The store.", [{[store: m.store, store_id: m.store_id, mode: m.mode], 1}]),
      metric("kuma_uptime_seconds", :gauge, "Seconds since the store opened.", [{st, m.uptime_seconds}]),
      metric("kuma_appends_total", :counter, "Appends committed.", [{st, c.appends}]),
      metric("kuma_append_errors_total", :counter, "Appends refused or failed.", [{st, c.append_errors}]),
      metric("kuma_events_appended_total", :counter, "Events committed.", [{st, c.events}]),
      metric("kuma_bytes_appended_total", :counter, "Encoded event bytes committed.", [{st, c.bytes}]),
      histogram(m),
      metric("kuma_executes_total", :counter, "Commands decided by aggregates.", [{st, c.executes}]),
      metric("kuma_entity_loads_total", :counter, "Entity processes started from storage.", [{st, c.loads}]),
      metric("kuma_entity_passivations_total", :counter, "Idle entities stopped.", [{st, c.passivations}]),
      metric("kuma_entities_live", :gauge, "Entity processes running.", [{st, m.entities_live}]),
      metric("kuma_snapshots_total", :counter, "Snapshots written.", [{st, c.snapshots}]),
      metric("kuma_erasures_total", :counter, "Entities erased.", [{st, c.erasures}]),
      metric(
        "kuma_shard_position",
        :gauge,
        "Last committed position of a shard.",
        for(sh <- m.shards, do: {st ++ [shard: sh.shard], sh.position})
      ),
      metric(
        "kuma_shard_transactions_total",
        :counter,
        "Group commits of a shard.",
        for(sh <- m.shards, do: {st ++ [shard: sh.shard], sh.transactions})
      ),
      metric(
        "kuma_writer_queue_depth",
        :gauge,
        "Commands waiting for a writer thread.",
        for({q, w} <- Enum.with_index(m.writer_queues), do: {st ++ [writer: w], q})
      ),
      if(m.global_position,
        do: metric("kuma_global_position", :gauge, "End of the store-wide order.", [{st, m.global_position}]),
        else: []
      ),
      metric(
        "kuma_projection_lag",
        :gauge,
        "Positions a projection is behind the commits.",
        for(p <- m.projections, p.lag != nil, do: {st ++ [projection: p.name], p.lag})
      ),
      metric(
        "kuma_projection_events_total",
        :counter,
        "Events a projection handled.",
        for(p <- m.projections, do: {st ++ [projection: p.name], p.handled})
      ),
      metric(
        "kuma_beam_memory_bytes",
        :gauge,
        "BEAM memory (:erlang.memory/0).",
        for({k, v} <- m.memory.beam, do: {[kind: k], v})
      ),
      metric(
        "kuma_native_memory_bytes",
        :gauge,
        "Memory held outside the BEAM.",
        for({k, v} <- m.memory.native, do: {[kind: k], v})
      ),
      if(m.memory.resident,
        do:
          metric("process_resident_memory_bytes", :gauge, "Resident memory of the OS process.", [
            {[], m.memory.resident}
          ]),
        else: []
      ),
      cluster_metrics(m)
    ]
  end

  defp cluster_metrics(%{cluster: nil}), do: []

  defp cluster_metrics(%{cluster: cl, store: store}) do
    [
      metric(
        "kuma_cluster_nodes",
        :gauge,
        "Cluster nodes by state.",
        for({state, n} <- cl.nodes, do: {[store: store, state: state], n})
      ),
      metric("kuma_cluster_shards_led", :gauge, "Shards this node leads.", [{[store: store], cl.shards_led}])
    ]
  end

  defp histogram(m) do
    %{bounds_us: bounds, counts: counts, sum_us: sum} = m.append_latency
    labels = [store: m.store]
    cumulative = Enum.scan(counts, &+/2)
    les = Enum.map(bounds, &(&1 / 1_000_000)) ++ ["+Inf"]

    [
      "# HELP kuma_append_duration_seconds Append latency, from the call to the commit's answer.\n",
      "# TYPE kuma_append_duration_seconds histogram\n",
      for(
        {le, n} <- Enum.zip(les, cumulative),
        do: sample("kuma_append_duration_seconds_bucket", labels ++ [le: le], n)
      ),
      sample("kuma_append_duration_seconds_sum", labels, sum / 1_000_000),
      sample("kuma_append_duration_seconds_count", labels, List.last(cumulative))
    ]
  end

  defp metric(_name, _type, _help, []), do: []

  defp metric(name, type, help, samples) do
    [
      "# HELP ",
      name,
      " ",
      help,
      "\n# TYPE ",
      name,
      " ",
      Atom.to_string(type),
      "\n",
      for({labels, v} <- samples, do: sample(name, labels, v))
    ]
  end

  defp sample(name, [], value), do: [name, " ", number(value), "\n"]

  defp sample(name, labels, value) do
    pairs = Enum.map_intersperse(labels, ",", fn {k, v} -> [Atom.to_string(k), "=\"", escape(label(v)), "\""] end)
    [name, "{", pairs, "} ", number(value), "\n"]
  end

  defp label(v) when is_atom(v), do: Atom.to_string(v)
  defp label(v) when is_binary(v), do: v
  defp label(v) when is_float(v), do: :erlang.float_to_binary(v, [:short])
  defp label(v), do: to_string(v)

  defp escape(s), do: s |> String.replace("\\", "\\\\") |> String.replace("\"", "\\\"") |> String.replace("\n", "\\n")

  defp number(v) when is_integer(v), do: Integer.to_string(v)
  defp number(v) when is_float(v), do: :erlang.float_to_binary(v, [:short])
  defp number(nil), do: "NaN"
end
