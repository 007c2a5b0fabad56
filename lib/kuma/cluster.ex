defmodule Kuma.Cluster do
  @moduledoc """
  Cluster mode: every shard replicated by Raft on several nodes, entities reachable from
  any node, and no acknowledged write lost when a node dies.

      # on every node (same options), e.g. three nodes started with --sname a/b/c:
      {:ok, store} = Kuma.start(name: :bank, data_dir: "data", shards: 16,
                                cluster: [seeds: [:"a@host", :"b@host", :"c@host"], replicas: 3])
      alice = Kuma.entity(store, Bank.Account, "alice")   # from any node
      {:ok, _} = Kuma.execute(alice, {:deposit, 50})       # runs on alice's shard leader

  Without `:cluster` a store runs on one node, as always: no Raft, nothing started for it.

  ## Options (`cluster: [...]`)

  * `:seeds` (required) - the nodes that found the cluster and hold its metadata (a seed
    that leaves hands its part to another node). Every node is started with the same
    list (and the same `:shards`, `:encryption` and master key). A node that is not a seed
    joins the cluster through them, and shards move to it.
  * `:replicas` - members of each shard's Raft group (default 3, at most the number of
    seeds). `replicas: 3` keeps every acknowledged write on a majority (2 of 3 nodes): one
    node can die or be cut off and its shards go on elsewhere within about a second.
    `replicas: 1` keeps one copy: nothing is replicated and a node's loss makes its shards
    unavailable (never lost: they come back with the node), the trade-off of a store that
    scales by adding nodes rather than by copying.
  * `:start_timeout` - ms `Kuma.start/1` waits for a majority of the seeds to form the
    cluster (default 60,000).
  * `:snapshot_every` - Raft log entries per shard between two snapshots (default 5,000).
    A snapshot is a copy of the shard file; Raft's log is truncated up to it, and a member
    that missed the truncated entries catches up from it.
  * `:max_moves` - shard moves per rebalancing round, run side by side (default 4).
  * `:max_moves_per_node` - moves a node takes part in per round (default 2).
  * `:move_timeout` - ms a new replica has to catch up before its move is rolled back and
    tried again later (default 60,000).
  * `:replace_after` - ms a node may stay unreachable before it is removed from the
    cluster's nodes and its replicas are rebuilt on the others (default 60,000). A node
    that returns sooner rejoins as a follower; one that returns later registers again,
    drops its old replicas, and receives shards like a new node.
  * `:projection_failover` - ms a projection's node may stay unreachable before the
    projection is started on another node (default 5,000; see "Projections" below).

  ## Projections, read models and subscriptions

  Each projection and read model runs once in the cluster, on one node (its owner, placed
  by rendezvous hashing of its name over the active nodes), whichever node started it; the
  store's `projections:` option declares them on every node alike. `Kuma.Projection`
  functions and `Kuma.ReadModel.query/4` work from any node. When the owner leaves, is
  removed, or stays unreachable for `:projection_failover`, another node takes it over: a
  projection resumes from its last checkpoint (saved in the metadata group every second,
  so a few events may be handed over again, as after a restart), a read model is built
  again from the first event on its new node (its rows lived in a file on the old one).
  Positions are the same on every replica of a shard, so a checkpoint holds on any node
  and across failovers. Subscriptions run on the subscriber's node. An erasure tells every
  node's projections (`forget`); one whose node cannot be reached makes `Kuma.delete/2`
  answer `{:error, {:forget_unconfirmed, [...]}}`, as on a single node.

  ## How it works (docs/cluster.md has the whole design)

  * A small Raft group of all seeds holds the cluster's identity: its id, the shard count,
    the replica count and the key of the keyed hashes of ids (every replica must find an
    entity under the same hash). A node started with other settings is refused with
    `{:cluster_mismatch, why}`.
  * Shard `i` is a Raft group (ra, RabbitMQ's Raft library) of `replicas` nodes, placed by
    `placement/4` over the active nodes; shards move when nodes join or leave
    (`Kuma.leave/2`, `Kuma.cluster_info/1`). Its leader owns it: the shard's entity processes run there only, and its
    writes are prepared there (seqs, timestamp, sealed bytes, new keys wrapped), then
    committed through Raft and applied by every member into its own copy of the shard
    file, in one transaction that records the Raft index. So every copy holds the same
    events at the same positions with the same chain, and an acknowledged write is on a
    majority of them.
  * Every write carries a command id; a retry after a timeout or a leader change reuses it
    and gets the first answer again, never a second append. A write whose outcome could
    not be learned returns `{:error, {:outcome_unknown, why}}`: read the entity to know.
  * Calls from any node are routed to the shard's leader (`Kuma.Cluster.Route`).

  ## What cluster mode does not do yet

  Master key rotation.
  Values about a subject (`Kuma.sensitive/3`) need the subject's key on the writing node.
  """

  # The options that take a positive integer: their defaults, and what they count (said in
  # the error for a bad value).
  @counts [
    start_timeout: {60_000, "ms"},
    snapshot_every: {5_000, "log entries"},
    max_moves: {4, "shard moves per round"},
    max_moves_per_node: {2, "moves a node takes part in per round"},
    move_timeout: {60_000, "ms"},
    replace_after: {60_000, "ms"},
    projection_failover: {5_000, "ms"}
  ]

  @enforce_keys [:seeds, :replicas, :system]
  defstruct [:seeds, :replicas, :system, :id, :routes] ++ for({key, {default, _}} <- @counts, do: {key, default})

  @type t :: %__MODULE__{
          seeds: [node()],
          replicas: pos_integer(),
          start_timeout: pos_integer(),
          system: atom(),
          id: String.t() | nil,
          routes: :ets.tid() | nil,
          snapshot_every: pos_integer(),
          max_moves: pos_integer(),
          max_moves_per_node: pos_integer(),
          move_timeout: pos_integer(),
          replace_after: pos_integer(),
          projection_failover: pos_integer()
        }

  require Logger

  @options [:seeds, :replicas | Keyword.keys(@counts)]

  @doc false
  # Validates the `:cluster` option of `Kuma.start/1` (nil: single node).
  @spec validate(term(), atom()) :: {:ok, t() | nil} | {:error, term()}
  def validate(nil, _name), do: {:ok, nil}

  def validate(opts, name) when is_list(opts) do
    seeds = Keyword.get(opts, :seeds)
    replicas = Keyword.get(opts, :replicas, 3)
    counts = for {key, {default, _}} <- @counts, do: {key, Keyword.get(opts, key, default)}

    cond do
      not Keyword.keyword?(opts) ->
        invalid("must be a keyword list")

      (unknown = Keyword.keys(opts) -- @options) != [] ->
        {:error, {:unknown_option, {:cluster, hd(unknown)}}}

      not (is_list(seeds) and seeds != [] and Enum.all?(seeds, &is_atom/1)) ->
        invalid(":seeds must be a non-empty list of node names")

      length(Enum.uniq(seeds)) != length(seeds) ->
        invalid(":seeds lists a node twice")

      not is_integer(replicas) or replicas < 1 or replicas > length(seeds) ->
        invalid(":replicas must be an integer from 1 to the number of seeds (#{length(seeds)})")

      (bad = Enum.find(counts, fn {_key, value} -> not (is_integer(value) and value >= 1) end)) != nil ->
        {key, _value} = bad
        {_default, unit} = @counts[key]
        invalid(":#{key} must be a positive integer (#{unit})")

      node() == :nonode@nohost ->
        invalid("this VM is not a distributed node: start it with --sname or --name")

      true ->
        {:ok, struct!(__MODULE__, [seeds: Enum.sort(seeds), replicas: replicas, system: system(name)] ++ counts)}
    end
  end

  def validate(_other, _name), do: invalid("must be a keyword list")

  defp invalid(why), do: {:error, {:invalid, :cluster, why}}

  @doc false
  # The ra system of a store: one per store and node, its files under <data_dir>/raft.
  def system(name), do: :"kuma_#{name}"

  @doc """
  Where shard `shard` goes among `nodes`: the `replicas` nodes that score highest for it
  (rendezvous hashing on the cluster id, the shard and the node). Adding a node moves only
  the shards it now scores highest for; removing one moves only its own. The first node is
  the one the shard's leadership is handed to, which spreads leaders as evenly as shards.
  """
  @spec placement(String.t(), [node()], non_neg_integer(), pos_integer()) :: [node()]
  def placement(cluster_id, nodes, shard, replicas) do
    nodes
    |> Enum.sort_by(&:crypto.hash(:sha256, [cluster_id, <<shard::32>>, Atom.to_string(&1)]), :desc)
    |> Enum.take(replicas)
  end

  @doc """
  Where projection `name` runs when it needs an owner: by rendezvous hashing, like shards,
  among the active nodes of the metadata `view` that are in `up` (nil if none is).
  """
  @spec home(map(), MapSet.t(), atom()) :: node() | nil
  def home(view, up, name) do
    key = Atom.to_string(name)

    for({n, :active} <- view.nodes, MapSet.member?(up, n), do: n)
    |> Enum.max_by(&:crypto.hash(:sha256, [view.identity.cluster_id, "projection", key, Atom.to_string(&1)]), fn ->
      nil
    end)
  end

  @doc """
  The members of shard `shard` as this node last learned them (from the metadata group,
  refreshed every second by `Kuma.Cluster.Shards`, and at once by this node's moves).
  """
  @spec members(t(), non_neg_integer()) :: [node()]
  def members(%__MODULE__{routes: routes}, shard) do
    case :ets.lookup(routes, {:members, shard}) do
      [{_, members}] -> members
      [] -> []
    end
  end

  @doc """
  The nodes that run members of the metadata group, as this node last learned them (none
  before it joined; then refreshed every second by `Kuma.Cluster.Shards`).
  """
  @spec meta_members(t()) :: [node()]
  def meta_members(%__MODULE__{routes: nil}), do: []

  def meta_members(%__MODULE__{routes: routes}) do
    case :ets.lookup(routes, :meta_members) do
      [{_, members}] -> members
      [] -> []
    end
  end

  @doc false
  def put_meta_members(%__MODULE__{routes: routes}, members), do: :ets.insert(routes, {:meta_members, members})

  @doc false
  def put_members(%__MODULE__{routes: routes}, shard, members),
    do: :ets.insert(routes, {{:members, shard}, members})

  @doc """
  Takes this node out of the cluster (`Kuma.leave/2`): marks it leaving, waits while its
  shards move to the other nodes (Kuma.Cluster.Rebalancer), then removes it from the
  cluster's nodes and stops the store here. Logs progress every 10 s.
  """
  @spec leave(Kuma.Store.t(), timeout()) :: :ok | {:error, term()}
  def leave(%Kuma.Store{cluster: nil}, _timeout), do: {:error, :not_a_cluster}

  def leave(%Kuma.Store{cluster: c} = s, timeout) do
    deadline = if timeout == :infinity, do: :infinity, else: System.monotonic_time(:millisecond) + timeout

    case Kuma.Cluster.Meta.command(c, {:leave, node()}) do
      :ok -> wait_moved_away(s, deadline, 0)
      {:error, :seed} -> {:error, :seed_cannot_leave}
      {:error, :not_a_member} -> Kuma.Store.Supervisor.stop(s.name)
      {:error, {:too_few_nodes, _, _}} = error -> error
      {:error, reason} -> {:error, reason}
    end
  end

  defp wait_moved_away(s, deadline, round) do
    holding =
      case Kuma.Cluster.Meta.view(s.cluster) do
        {:ok, view} ->
          for({shard, members} <- view.shards, node() in members, do: shard) ++
            for {name, %{owner: owner}} <- view.projections, owner == node(), do: {:projection, name}

        _ ->
          :unknown
      end

    cond do
      holding == [] ->
        with :ok <- hand_over_metadata(s),
             :ok <- Kuma.Cluster.Meta.command(s.cluster, {:forget, node()}),
             do: Kuma.Store.Supervisor.stop(s.name)

      deadline != :infinity and System.monotonic_time(:millisecond) > deadline ->
        {:error, {:leave_unfinished, if(holding == :unknown, do: [], else: holding)}}

      true ->
        if rem(round, 20) == 19 do
          Logger.info("leaving the cluster: #{inspect(holding)} still to move away (shards, projections)")
        end

        Process.sleep(500)
        wait_moved_away(s, deadline, round + 1)
    end
  end

  # A node that runs a member of the metadata group (a seed) hands it over before it goes:
  # a member is started on another active node and added to the group, it catches up,
  # leadership moves off this node if it had it, this node's member is removed and deleted,
  # and the group's members are recorded. Each step reads Raft's membership first, so a
  # leave cut short finishes when called again.
  defp hand_over_metadata(%Kuma.Store{cluster: c} = s) do
    engine = Kuma.Cluster.Consensus.engine()
    group = meta_group(c)

    with {:ok, members, leader} <- meta_raft_members(c, group) do
      if node() in members do
        with {:ok, members, leader} <- add_meta_replacement(s, group, members, leader),
             {:ok, leader} <- meta_leader_elsewhere(group, leader, members -- [node()]),
             :ok <- engine.remove_member(group, leader, node(), 10_000) do
          _ = engine.delete_member(c.system, group)

          Logger.info(
            "leaving the cluster: this node's metadata member handed over (members now #{inspect(members -- [node()])})"
          )

          record_meta_members(c, members -- [node()])
        end
      else
        record_meta_members(c, members)
      end
    end
  end

  defp meta_raft_members(c, group) do
    engine = Kuma.Cluster.Consensus.engine()

    Enum.find_value(Enum.uniq([node() | meta_members(c) ++ c.seeds]), {:error, :metadata_unreachable}, fn via ->
      case engine.members(group, via, 2_000) do
        {:ok, members, leader} -> {:ok, members, leader}
        _ -> nil
      end
    end)
  end

  defp add_meta_replacement(s, group, members, leader) do
    c = s.cluster
    engine = Kuma.Cluster.Consensus.engine()
    up = MapSet.new(Node.list())

    with {:ok, view} <- Kuma.Cluster.Meta.view(c),
         candidates = for({n, :active} <- Enum.sort(view.nodes), n not in members, MapSet.member?(up, n), do: n),
         [to | _] <- candidates,
         %{commit_index: index} <- engine.local_status(group) || {:error, :no_local_member},
         :ok <- :erpc.call(to, Kuma.Cluster.Boot, :add_meta_member, [s.name, members ++ [to]], 30_000),
         :ok <- engine.add_member(group, leader, to, 10_000),
         :ok <- record_meta_members(c, members ++ [to]),
         :ok <-
           Kuma.Cluster.Rebalancer.caught_up(to, group, index, System.monotonic_time(:millisecond) + c.move_timeout) do
      {:ok, members ++ [to], leader}
    else
      [] -> {:error, :seed_cannot_leave}
      {:error, reason} -> {:error, reason}
      other -> {:error, other}
    end
  end

  defp meta_leader_elsewhere(_group, leader, _others) when leader != node(), do: {:ok, leader}

  defp meta_leader_elsewhere(group, _leader, [next | _] = others) do
    engine = Kuma.Cluster.Consensus.engine()
    _ = engine.transfer_leadership(group, node(), next)

    Enum.find_value(1..100, {:error, :leadership_not_handed_over}, fn _ ->
      Process.sleep(100)

      Enum.find_value(others, fn via ->
        case engine.members(group, via, 1_000) do
          {:ok, _, leader} when leader != node() -> {:ok, leader}
          _ -> nil
        end
      end)
    end)
  end

  defp record_meta_members(c, members) do
    put_meta_members(c, members)

    case Kuma.Cluster.Meta.command(c, {:meta_members, members}) do
      :ok -> :ok
      error -> {:error, {:not_recorded, error}}
    end
  end

  @doc """
  The cluster as seen from this node (`Kuma.cluster_info/1`): its nodes and their state,
  and for every shard its members, leader, term, commit index, each member's applied
  index and the largest lag, the moves under way, and where each projection runs (its
  owner and owner epoch).
  """
  @spec info(Kuma.Store.t()) :: {:ok, map()} | {:error, term()}
  def info(%Kuma.Store{cluster: nil}), do: {:error, :not_a_cluster}

  def info(%Kuma.Store{cluster: c} = s) do
    with {:ok, view} <- Kuma.Cluster.Meta.view(c) do
      up = MapSet.new([node() | Node.list()])
      groups = for shard <- 0..(s.shards - 1), do: shard_group(c, shard)

      statuses =
        view.nodes
        |> Map.keys()
        |> Enum.filter(&MapSet.member?(up, &1))
        |> Map.new(fn n -> {n, member_statuses(n, groups)} end)

      shards =
        for shard <- 0..(s.shards - 1) do
          group = shard_group(c, shard)
          members = Map.get(view.shards, shard, [])
          of = for n <- members, st = get_in(statuses, [n, group]), into: %{}, do: {n, st}
          leader = Enum.find_value(of, fn {n, st} -> if st.role == :leader, do: n end)
          commit = of |> Map.values() |> Enum.map(& &1.commit_index) |> Enum.max(fn -> 0 end)
          applied = Map.new(of, fn {n, st} -> {n, st.applied_index} end)

          %{
            shard: shard,
            members: members,
            leader: leader,
            term: of |> Map.values() |> Enum.map(& &1.term) |> Enum.max(fn -> nil end),
            commit_index: commit,
            applied_index: applied,
            lag: Enum.max(for(n <- members, do: commit - Map.get(applied, n, 0)), fn -> 0 end)
          }
        end

      nodes =
        Map.new(view.nodes, fn {n, state} ->
          {n, %{state: state, reachable: MapSet.member?(up, n), seed: n in c.seeds, metadata: n in view.meta_members}}
        end)

      moves = for {shard, m} <- Enum.sort(view.moves), do: Map.put(m, :shard, shard)

      projections =
        Map.new(view.projections, fn {name, p} -> {name, %{kind: p.kind, owner: p.owner, epoch: p.epoch}} end)

      {:ok, %{cluster_id: c.id, node: node(), nodes: nodes, shards: shards, moves: moves, projections: projections}}
    end
  end

  defp member_statuses(n, groups) when n == node(), do: local_statuses(groups)

  defp member_statuses(n, groups) do
    :erpc.call(n, __MODULE__, :local_statuses, [groups], 5_000)
  catch
    _, _ -> %{}
  end

  @doc false
  def local_statuses(groups) do
    engine = Kuma.Cluster.Consensus.engine()
    for g <- groups, st = engine.local_status(g), into: %{}, do: {g, st}
  end

  @doc false
  # The Raft group names of a store: its metadata group and each shard's group.
  def meta_group(%__MODULE__{system: system}), do: :"#{system}_meta"
  def shard_group(%__MODULE__{system: system}, shard), do: :"#{system}_shard_#{shard}"
end
