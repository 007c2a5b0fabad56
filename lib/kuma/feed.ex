defmodule Kuma.Feed do
  @moduledoc false
  # One per store. Shard writer threads tell it of every commit ({:kuma_commit, shard, pos},
  # sent by the NIF after the transaction committed); it forwards that to every process that
  # follows the store (projections, subscriptions), which then read the new events from
  # storage. Nothing polls: a follower that has caught up sleeps until the next commit.
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
    Native.store_follow_commits(s.native, self())
    if s.cluster, do: Process.send_after(self(), :tick, @tick_ms)
    {:ok, %{s: s, watchers: %{}, watching: %{}, heads: %{}, ticking: false}}
  end

  @impl true
  def handle_info({:kuma_commit, shard, pos}, st) do
    dispatch(st.s, shard, pos)

    if st.watchers != %{} and Shards.leader?(st.s, shard) do
      for {pid, _ref} <- st.watchers, do: send(pid, {:kuma_remote_commit, shard, pos})
    end

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

  def handle_info({:DOWN, ref, :process, pid, _}, st) do
    watchers = Map.delete(st.watchers, pid)
    watching = for {n, {p, r}} <- st.watching, r != ref, into: %{}, do: {n, {p, r}}
    {:noreply, %{st | watchers: watchers, watching: watching}}
  end

  def handle_info(_other, st), do: {:noreply, st}

  @impl true
  def handle_cast(:tick_now, st), do: {:noreply, tick(st)}

  @impl true
  def handle_call({:watch, watcher}, _from, st) do
    watchers =
      if Map.has_key?(st.watchers, watcher),
        do: st.watchers,
        else: Map.put(st.watchers, watcher, Process.monitor(watcher))

    {:reply, {:ok, self()}, %{st | watchers: watchers}}
  end

  @impl true
  def terminate(_reason, st) do
    Native.store_follow_commits(st.s.native, nil)
    :ok
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
