defmodule Kuma.Feed do
  @moduledoc false
  # One per store. Shard writer threads tell it of every commit ({:kuma_commit, shard, pos},
  # sent by the NIF after the transaction committed); it forwards that to every process that
  # follows the store (projections, subscriptions), which then read the new events from
  # storage. Nothing polls: a follower that has caught up sleeps until the next commit.
  #
  # A subscription to one entity (`Kuma.subscribe(store, entity_id: id)`, single node)
  # follows that entity only (`follow_entity/2`): the Feed then asks the writers for the
  # entities of each commit and tells such a follower only of the commits that wrote its
  # entity, with where its first event in the commit is and where the one before it was
  # ({:kuma_entity_commit, store, shard, last_pos, first_pos, prev_pos}), so the follower
  # can read from just before it (see Kuma.Projection.Runner). An idle subscription to an
  # entity that is not written costs nothing per commit. A commit that comes without its
  # entities (a shard opening, before the writers were asked) goes to every entity follower
  # of its shard, as a plain commit. Entity followers are kept in this process's state: if
  # it restarts, so does everything started after it in the store's supervisor
  # (rest_for_one), projections and subscriptions included, so none is left following a
  # Feed that forgot it.
  #
  # Cluster mode: a node holds copies of some shards only, and a shard's commits are made
  # by its leader. So the Feed of a node with followers watches the Feeds of the nodes that
  # hold shards, and each forwards the commits of the shards it leads. Every second it also
  # asks those nodes how far their copies have applied (what a copy applied is committed,
  # so the highest is a position the shard reached): a commit whose message was lost in a
  # leader change is noticed within that second.
  use GenServer

  alias Kuma.{Native, Store}
  alias Kuma.Cluster.Shards

  @tick_ms 1_000

  def child_spec(name), do: %{id: __MODULE__, start: {__MODULE__, :start_link, [name]}}

  def start_link(name), do: GenServer.start_link(__MODULE__, name, name: Store.via(name, :feed))

  @doc """
  Makes the caller a follower of the store: from now on it receives
  `{:kuma_commit, store_name, shard, last_pos}`. Returns the last committed position of
  every shard, read after registering, so no commit falls between the two.
  """
  @spec follow(Store.t()) :: Kuma.Position.t()
  def follow(%Store{} = s) do
    {:ok, _} = Registry.register(Kuma.Listeners, {s.name, :commits}, nil)
    if s.cluster, do: GenServer.cast(Store.via(s.name, :feed), :tick_now)
    heads(s)
  end

  @doc """
  Makes the caller a follower of one entity's commits (see the module comment): it
  receives `{:kuma_entity_commit, store_name, shard, last_pos, first_pos, prev_pos}` for
  each commit that wrote the entity (or a plain `{:kuma_commit, ...}` of its shard when
  the commit came without its entities). Until the caller exits. Returns the heads, read
  after registering. In cluster mode the same as `follow/1`.
  """
  @spec follow_entity(Store.t(), binary()) :: Kuma.Position.t()
  def follow_entity(%Store{cluster: nil} = s, entity_id) do
    shard = Native.store_shard_for(s.native, entity_id)
    :ok = GenServer.call(Store.via(s.name, :feed), {:follow_entity, self(), entity_id, shard})
    heads(s)
  end

  def follow_entity(%Store{} = s, _entity_id), do: follow(s)

  @doc """
  Makes the caller a follower of the store-wide order (single node): it receives
  `{:kuma_order, store_name, watermark}` each time the order records more commits.
  """
  @spec follow_order(Store.t()) :: :ok
  def follow_order(%Store{} = s) do
    {:ok, _} = Registry.register(Kuma.Listeners, {s.name, :order}, nil)
    :ok
  end

  @doc "The last committed position of every shard (cluster mode: as far as the copies reached)."
  @spec heads(Store.t()) :: Kuma.Position.t()
  def heads(%Store{cluster: nil} = s), do: local_heads(s)

  def heads(%Store{} = s) do
    nodes = holders(s)

    nodes
    |> :erpc.multicall(__MODULE__, :local_heads, [s.name, s.cluster.id], 2_000)
    |> Enum.reduce(local_heads(s), fn
      {:ok, %{} = heads}, acc -> Map.merge(acc, heads, fn _shard, a, b -> max(a, b) end)
      _, acc -> acc
    end)
  end

  defp local_heads(%Store{native: native}) do
    native |> Native.store_commit_positions() |> Enum.with_index() |> Map.new(fn {pos, shard} -> {shard, pos} end)
  end

  @doc false
  # Run on a node holding shards: how far its copies have applied.
  def local_heads(name, cluster_id) do
    case Store.lookup(name) do
      {:ok, %Store{cluster: %{id: ^cluster_id}} = s} -> local_heads(s)
      _ -> nil
    end
  end

  @doc false
  # Run on a node holding shards: the Feed there forwards the commits of the shards it leads
  # to `watcher` (a Feed of another node) until either goes down.
  def watch(name, cluster_id, watcher) do
    with {:ok, %Store{cluster: %{id: ^cluster_id}}} <- Store.lookup(name) do
      GenServer.call(Store.via(name, :feed), {:watch, watcher}, 2_000)
    end
  catch
    :exit, _ -> {:error, :no_feed}
  end

  # Other nodes that hold shards of the store, as this node last learned them.
  defp holders(s) do
    for(shard <- 0..(s.shards - 1), n <- Kuma.Cluster.members(s.cluster, shard), n != node(), do: n)
    |> Enum.uniq()
  end

  @impl true
  def init(name) do
    Process.flag(:trap_exit, true)
    {:ok, s} = Store.lookup(name)
    Native.store_follow_commits(s.native, self(), false)
    if s.cluster == nil, do: Native.store_follow_order(s.native, self())
    if s.cluster, do: Process.send_after(self(), :tick, @tick_ms)
    # entities: entity id => %{pid => shard}; entity_of: pid => {entity id, monitor}.
    {:ok, %{s: s, watchers: %{}, watching: %{}, heads: %{}, ticking: false, entities: %{}, entity_of: %{}}}
  end

  @impl true
  def handle_info({:kuma_commit, shard, pos}, st) do
    dispatch(st.s, shard, pos)
    for {_id, pids} <- st.entities, {pid, ^shard} <- pids, do: send(pid, {:kuma_commit, st.s.name, shard, pos})
    {:noreply, forward(st, shard, pos)}
  end

  def handle_info({:kuma_commit, shard, pos, written}, st) do
    dispatch(st.s, shard, pos)

    for {id, first, prev} <- written, {pid, _shard} <- Map.get(st.entities, id, %{}) do
      send(pid, {:kuma_entity_commit, st.s.name, shard, pos, first, prev})
    end

    {:noreply, forward(st, shard, pos)}
  end

  def handle_info({:kuma_order, watermark}, st) do
    message = {:kuma_order, st.s.name, watermark}

    Registry.dispatch(Kuma.Listeners, {st.s.name, :order}, fn followers ->
      for {pid, _} <- followers, do: send(pid, message)
    end)

    {:noreply, st}
  end

  def handle_info({:kuma_remote_commit, shard, pos}, st) do
    dispatch(st.s, shard, pos)
    {:noreply, %{st | heads: Map.update(st.heads, shard, pos, &max(&1, pos))}}
  end

  def handle_info(:tick, st) do
    Process.send_after(self(), :tick, @tick_ms)
    {:noreply, tick(st)}
  end

  # What a tick found (see tick/1).
  def handle_info({:ticked, heads, watching}, st) do
    new = for {shard, pos} <- heads, pos > Map.get(st.heads, shard, 0), do: {shard, pos}
    for {shard, pos} <- new, do: dispatch(st.s, shard, pos)

    watching =
      Enum.reduce(watching, st.watching, fn {n, pid}, acc ->
        if Map.has_key?(acc, n), do: acc, else: Map.put(acc, n, {pid, Process.monitor(pid)})
      end)

    {:noreply, %{st | heads: Map.merge(st.heads, Map.new(new)), watching: watching, ticking: false}}
  end

  def handle_info({:DOWN, _ref, :process, pid, _}, st) when is_map_key(st.entity_of, pid) do
    {{id, _ref}, entity_of} = Map.pop(st.entity_of, pid)
    pids = st.entities |> Map.fetch!(id) |> Map.delete(pid)
    entities = if pids == %{}, do: Map.delete(st.entities, id), else: Map.put(st.entities, id, pids)
    # The last one gone: the writers need not collect the entities of commits any more.
    if entities == %{}, do: Native.store_follow_commits(st.s.native, self(), false)
    {:noreply, %{st | entities: entities, entity_of: entity_of}}
  end

  def handle_info({:DOWN, ref, :process, pid, _}, st) do
    watchers = Map.delete(st.watchers, pid)
    watching = for {n, {p, r}} <- st.watching, r != ref, into: %{}, do: {n, {p, r}}
    {:noreply, %{st | watchers: watchers, watching: watching}}
  end

  def handle_info(_other, st), do: {:noreply, st}

  @impl true
  def handle_cast(:tick_now, st), do: {:noreply, tick(st)}

  @impl true
  def handle_call({:follow_entity, pid, id, shard}, _from, st) do
    if st.entities == %{}, do: Native.store_follow_commits(st.s.native, self(), true)
    ref = if Map.has_key?(st.entity_of, pid), do: elem(st.entity_of[pid], 1), else: Process.monitor(pid)
    entities = Map.update(st.entities, id, %{pid => shard}, &Map.put(&1, pid, shard))
    {:reply, :ok, %{st | entities: entities, entity_of: Map.put(st.entity_of, pid, {id, ref})}}
  end

  def handle_call({:watch, watcher}, _from, st) do
    watchers =
      if Map.has_key?(st.watchers, watcher),
        do: st.watchers,
        else: Map.put(st.watchers, watcher, Process.monitor(watcher))

    {:reply, {:ok, self()}, %{st | watchers: watchers}}
  end

  @impl true
  def terminate(_reason, st) do
    Native.store_follow_commits(st.s.native, nil, false)
    if st.s.cluster == nil, do: Native.store_follow_order(st.s.native, nil)
    :ok
  end

  # Cluster mode: the commits of shards this node leads go to the Feeds watching it.
  defp forward(st, shard, pos) do
    if st.watchers != %{} and Shards.leader?(st.s, shard) do
      for {pid, _ref} <- st.watchers, do: send(pid, {:kuma_remote_commit, shard, pos})
    end

    st
  end

  defp dispatch(s, shard, pos) do
    message = {:kuma_commit, s.name, shard, pos}

    Registry.dispatch(Kuma.Listeners, {s.name, :commits}, fn followers ->
      for {pid, _} <- followers, do: send(pid, message)
    end)
  end

  # Cluster mode, while this node has followers: in a task (a node that does not answer
  # must not hold up the local commits), watch the Feeds of the nodes holding shards not
  # watched yet, and read how far every shard got.
  defp tick(%{ticking: true} = st), do: st

  defp tick(%{s: s} = st) do
    if Registry.lookup(Kuma.Listeners, {s.name, :commits}) == [] do
      st
    else
      feed = self()
      watched = Map.keys(st.watching)

      spawn_link(fn ->
        try do
          watching = for n <- holders(s) -- watched, {:ok, pid} <- [safe_watch(n, s, feed)], do: {n, pid}
          send(feed, {:ticked, heads(s), watching})
        catch
          _, _ -> send(feed, {:ticked, %{}, []})
        end
      end)

      %{st | ticking: true}
    end
  end

  defp safe_watch(n, s, feed) do
    :erpc.call(n, __MODULE__, :watch, [s.name, s.cluster.id, feed], 2_000)
  catch
    _, _ -> {:error, :unreachable}
  end
end
