defmodule Kuma.Cluster.Rebalancer do
  @moduledoc false
  # Cluster mode: moves shards so that each is held by the nodes `Kuma.Cluster.placement/4`
  # picks among the active nodes. Runs on every node and acts only where this node's member
  # of the metadata group (if it runs one) leads (one rebalancer at a time; a new one takes over when that
  # leader changes, and resumes from what Raft says, never from what it remembers).
  #
  # Every round (2 s, or at once after a round that moved shards): nodes unreachable for
  # `:replace_after` are removed from the cluster's nodes, projections whose node is
  # gone, leaving or unreachable for `:projection_failover` get a new one, then at most `:max_moves` moves
  # run side by side, each node in at most `:max_moves_per_node` of them. A move of shard
  # S from A to B (either may be absent: only an add, or only a removal):
  #
  #   1. recorded as under way in the metadata group (so B's new member is not taken for a
  #      stale one, and `Kuma.cluster_info/1` shows it);
  #   2. B runs a member, which is added to S's group. ra 2.2 has no non-voting members,
  #      so B votes at once: with 3 members the 4-member group still commits on the old
  #      three; with `replicas: 1` writes wait for B to catch up;
  #   3. wait until B has applied what the group had committed when it was added (from a
  #      snapshot, a copy of the shard file, and the log), at most `:move_timeout`; a move
  #      that misses it is rolled back (B removed, its files deleted) and tried again in a
  #      later round;
  #   4. if A leads S, leadership goes to another member first; then A is removed from the
  #      group, and A drops its member, its Raft files, and its copy of S with its entities'
  #      keys (if A is down, it does so when it comes back: Kuma.Cluster.Shards);
  #   5. the new members are recorded in the metadata group, and the move as done.
  #
  # When A is down (being replaced), 4 comes before 2: the remaining members commit without
  # A, and writes never wait for B to catch up.
  #
  # In quiet rounds, leaders are handed back to the first node of each shard's placement
  # (`balance_leaders/3`), so that failovers do not leave them piled on a few nodes. A
  # leader that changes is safe for readers: a read is served only by a leader that has
  # confirmed it still leads (Kuma.Cluster.ReadGate).
  #
  # Every step reads the group's actual members first, so a move interrupted anywhere (a
  # crash of A, B, or this node) is finished or rolled back by the next round.
  use GenServer

  require Logger

  alias Kuma.{Cluster, Store}
  alias Kuma.Cluster.{Consensus, Meta, Shards}

  @round_ms 2_000

  def start_link(name), do: GenServer.start_link(__MODULE__, name, name: Store.via(name, :rebalancer))

  @impl true
  def init(name) do
    Process.send_after(self(), :round, @round_ms)
    {:ok, %{store: name, down_since: %{}, moved: false, misled: %{}, quiet: 0}}
  end

  @impl true
  def handle_info(:round, st) do
    st =
      with {:ok, s} <- Store.lookup(st.store),
           {:ok, leader} <- Consensus.engine().leader(Cluster.meta_group(s.cluster), node(), 1_000),
           true <- leader == node(),
           {:ok, view} <- Meta.view(s.cluster) do
        st = replace_dead(st, s.cluster, view)
        place_projections(st, s.cluster, view)
        moves = plan(view, s.shards, s.cluster.max_moves, s.cluster.max_moves_per_node)

        moves
        |> Task.async_stream(fn {shard, from, to} -> move(s, shard, from, to) end,
          max_concurrency: max(length(moves), 1),
          timeout: :infinity
        )
        |> Stream.run()

        quiet = moves == [] and view.moves == %{}
        st = %{st | moved: moves != [], quiet: if(quiet, do: st.quiet + 1, else: 0)}
        if quiet, do: balance_leaders(st, s, view), else: st
      else
        _ -> %{st | down_since: %{}, moved: false, misled: %{}, quiet: 0}
      end

    # After a round that moved shards, the next one starts at once.
    Process.send_after(self(), :round, if(st.moved, do: 50, else: @round_ms))
    {:noreply, st}
  end

  def handle_info(_other, st), do: {:noreply, st}

  # Nodes unreachable from here for `:replace_after` are removed from the cluster's nodes:
  # the next rounds rebuild their replicas elsewhere. (Only the metadata leader counts, and
  # its count starts again when leadership moves: a node is never removed sooner.)
  defp replace_dead(st, c, view) do
    now = System.monotonic_time(:millisecond)
    up = MapSet.new([node() | Node.list()])

    down_since = for {n, _} <- view.nodes, not MapSet.member?(up, n), into: %{}, do: {n, Map.get(st.down_since, n, now)}

    for {n, since} <- down_since, now - since >= c.replace_after do
      case Meta.command(c, {:remove_node, n}) do
        :ok ->
          Logger.warning(
            "node #{n} unreachable for #{div(now - since, 1000)} s: removed; its replicas are rebuilt elsewhere"
          )

        _ ->
          :ok
      end
    end

    %{st | down_since: down_since}
  end

  # A projection gets a new owner (Kuma.Cluster.Projections) when it has none, when its
  # owner is leaving or no longer a node of the cluster, or when its owner has been
  # unreachable from here for `:projection_failover`: its home among the active nodes
  # reachable from here.
  defp place_projections(st, c, view) do
    now = System.monotonic_time(:millisecond)
    up = MapSet.new([node() | Node.list()])

    for {name, p} <- view.projections,
        why = displaced(p, view, st.down_since, now, c),
        home = Cluster.home(view, up, name),
        home != nil do
      case Meta.command(c, {:own_projection, name, home, p.owner}) do
        {:ok, ^home, epoch} ->
          Logger.info("projection #{inspect(name)}: #{why}; it runs on #{home} now (owner epoch #{epoch})")

        _ ->
          :ok
      end
    end
  end

  defp displaced(%{owner: nil}, _view, _down, _now, _c), do: "no owner yet"

  defp displaced(%{owner: owner}, view, down_since, now, c) do
    cond do
      Map.get(view.nodes, owner) != :active -> "#{owner} is leaving or gone"
      now - Map.get(down_since, owner, now) >= c.projection_failover -> "#{owner} unreachable"
      true -> nil
    end
  end

  # Leaders spread as placement spreads them: every fifth quiet round (about 10 s), a shard
  # whose leader is not the first node of its placement, found so in two such checks in a
  # row (not in the middle of an election after a restart), hands leadership to that node
  # if it is a member and reachable; at most `:max_moves` shards per check.
  defp balance_leaders(%{quiet: quiet} = st, _s, _view) when rem(quiet, 5) != 0, do: st

  defp balance_leaders(st, s, view) do
    c = s.cluster
    active = for {n, :active} <- view.nodes, do: n
    up = MapSet.new([node() | Node.list()])

    misled =
      for {shard, members} <- view.shards,
          preferred = hd(Cluster.placement(view.identity.cluster_id, active, shard, view.identity.replicas)),
          preferred in members and MapSet.member?(up, preferred),
          {:ok, _, leader} <- [actual(c, shard)],
          leader != preferred,
          into: %{},
          do: {shard, {leader, preferred}}

    misled
    |> Enum.filter(fn {shard, _} -> Map.has_key?(st.misled, shard) end)
    |> Enum.take(c.max_moves)
    |> Enum.each(fn {shard, {leader, preferred}} ->
      case Consensus.engine().transfer_leadership(Cluster.shard_group(c, shard), leader, preferred) do
        :ok -> Logger.info("shard #{shard}: leadership handed from #{leader} to #{preferred} (placement)")
        _ -> :ok
      end
    end)

    %{st | misled: misled}
  end

  @doc """
  The moves to make now: `{shard, from, to}` (`from` or `to` may be nil), the moves recorded
  as under way first (to finish or roll back), then shards whose members differ from their
  placement; at most `max` in all, and each node in at most `per_node` of them.
  """
  @spec plan(map(), pos_integer(), pos_integer(), pos_integer()) :: [{non_neg_integer(), node() | nil, node() | nil}]
  def plan(view, shards, max, per_node) do
    active = for {node, :active} <- view.nodes, do: node
    replicas = view.identity.replicas

    if length(active) < replicas do
      []
    else
      unfinished = for {shard, %{from: from, to: to}} <- Enum.sort(view.moves), do: {shard, from, to}

      wanted =
        for shard <- 0..(shards - 1), not Map.has_key?(view.moves, shard) do
          current = Map.get(view.shards, shard, [])
          target = Cluster.placement(view.identity.cluster_id, active, shard, replicas)
          {shard, List.first(current -- target), List.first(target -- current)}
        end

      (unfinished ++ Enum.reject(wanted, &match?({_, nil, nil}, &1)))
      |> Enum.reduce({[], %{}}, fn {_, from, to} = m, {picked, busy} ->
        nodes = Enum.reject([from, to], &is_nil/1)

        if length(picked) < max and Enum.all?(nodes, &(Map.get(busy, &1, 0) < per_node)),
          do: {[m | picked], Enum.reduce(nodes, busy, &Map.update(&2, &1, 1, fn n -> n + 1 end))},
          else: {picked, busy}
      end)
      |> elem(0)
      |> Enum.reverse()
    end
  end

  @doc "Moves shard `shard` from node `from` to node `to` (see the module's notes)."
  @spec move(Store.t(), non_neg_integer(), node() | nil, node() | nil) :: :ok | {:error, term()}
  def move(s, shard, from, to) do
    c = s.cluster
    started = System.monotonic_time(:millisecond)

    result =
      with :ok <- Meta.command(c, {:move, shard, %{from: from, to: to, since: System.os_time(:millisecond)}}),
           {:ok, actual, leader} <- actual(c, shard),
           {:ok, actual} <- add_and_remove(s, shard, actual, leader, from, to) do
        record(c, shard, actual)
      end

    case result do
      :ok ->
        Logger.info(
          "shard #{shard}: moved from #{inspect(from)} to #{inspect(to)} in #{System.monotonic_time(:millisecond) - started} ms"
        )

      {:error, reason} ->
        Logger.warning("shard #{shard}: move from #{inspect(from)} to #{inspect(to)} failed: #{inspect(reason)}")
    end

    _ = Meta.command(c, {:move, shard, nil})
    result
  end

  # The group's members and leader, as Raft has them now, asking the members this node
  # knows of in turn.
  defp actual(c, shard) do
    group = Cluster.shard_group(c, shard)

    Enum.find_value(Cluster.members(c, shard), {:error, {:no_leader, shard}}, fn via ->
      case Consensus.engine().members(group, via, 2_000) do
        {:ok, members, leader} -> {:ok, members, leader}
        _ -> nil
      end
    end)
  end

  # A member on a node that is down is removed first: the others commit without it, and
  # writes never wait for the new member to catch up. Otherwise the new member comes first,
  # so the group never has fewer members than `replicas`.
  defp add_and_remove(s, shard, actual, leader, from, to) do
    if from != nil and from != node() and from not in Node.list() do
      with {:ok, actual} <- remove(s, shard, actual, from),
           {:ok, _, leader} <- actual(s.cluster, shard),
           do: add(s, shard, actual, leader, to)
    else
      with {:ok, actual} <- add(s, shard, actual, leader, to), do: remove(s, shard, actual, from)
    end
  end

  defp add(_s, _shard, actual, _leader, nil), do: {:ok, actual}

  defp add(s, shard, actual, leader, to) do
    c = s.cluster
    group = Cluster.shard_group(c, shard)
    engine = Consensus.engine()

    with %{commit_index: _} = status <- remote(leader, engine, :local_status, [group]),
         :ok <- if(to in actual, do: :ok, else: remote(to, Shards, :add_local, [s.name, shard, actual ++ [to]])),
         :ok <- engine.add_member(group, leader, to, 10_000),
         members = Enum.uniq(actual ++ [to]),
         _ = Cluster.put_members(c, shard, members),
         :ok <- caught_up(to, group, status.commit_index, System.monotonic_time(:millisecond) + c.move_timeout) do
      record(c, shard, members)
      {:ok, members}
    else
      error ->
        # Rolled back: the new member goes, and the group is as it was.
        _ = engine.remove_member(group, leader, to, 10_000)
        _ = remote(to, Shards, :drop_local, [s.name, shard])
        Cluster.put_members(c, shard, actual)
        {:error, {:not_added, to, error}}
    end
  end

  @doc false
  # Waits until `node`'s member of `group` has applied `index`, until `deadline`.
  @spec caught_up(node(), atom(), non_neg_integer(), integer()) :: :ok | {:error, :catch_up_timeout}
  def caught_up(node, group, index, deadline) do
    case remote(node, Consensus.engine(), :local_status, [group]) do
      %{applied_index: applied} when applied >= index ->
        :ok

      _ ->
        if System.monotonic_time(:millisecond) > deadline do
          {:error, :catch_up_timeout}
        else
          Process.sleep(100)
          caught_up(node, group, index, deadline)
        end
    end
  end

  defp remove(_s, _shard, actual, nil), do: {:ok, actual}

  defp remove(s, shard, actual, from) do
    c = s.cluster
    group = Cluster.shard_group(c, shard)
    engine = Consensus.engine()

    with true <- from in actual,
         {:ok, _, leader} <- actual(c, shard),
         {:ok, leader} <- hand_over(c, shard, leader, from, actual -- [from]),
         :ok <- engine.remove_member(group, leader, from, 10_000) do
      members = actual -- [from]
      record(c, shard, members)
      # A node that is down drops its member when it comes back (Kuma.Cluster.Shards).
      _ = remote(from, Shards, :drop_local, [s.name, shard])
      {:ok, members}
    else
      false -> {:ok, actual}
      error -> {:error, {:not_removed, from, error}}
    end
  end

  # Leadership leaves a node about to be removed: to the next member, then wait until
  # the group has a leader other than it.
  defp hand_over(_c, _shard, leader, from, _others) when leader != from, do: {:ok, leader}

  defp hand_over(c, shard, from, from, [next | _]) do
    group = Cluster.shard_group(c, shard)
    _ = Consensus.engine().transfer_leadership(group, from, next)
    deadline = System.monotonic_time(:millisecond) + 10_000

    Stream.repeatedly(fn ->
      Process.sleep(100)
      actual(c, shard)
    end)
    |> Enum.find_value(fn
      {:ok, _, leader} when leader != from -> {:ok, leader}
      _ -> if System.monotonic_time(:millisecond) > deadline, do: {:error, :leadership_not_handed_over}
    end)
  end

  defp hand_over(_c, _shard, _leader, _from, []), do: {:error, :no_other_member}

  defp record(c, shard, members) do
    Cluster.put_members(c, shard, members)

    case Meta.command(c, {:members, shard, members}) do
      :ok -> :ok
      error -> {:error, {:not_recorded, error}}
    end
  end

  defp remote(node, m, f, a) when node == node(), do: apply(m, f, a)

  defp remote(node, m, f, a) do
    :erpc.call(node, m, f, a, 60_000)
  catch
    kind, reason -> {:error, {:unreachable, node, {kind, reason}}}
  end
end
