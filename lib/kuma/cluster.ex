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

  * `:seeds` (required) - the nodes of the cluster, this one among them. Every node is
    started with the same list (and the same `:shards`, `:encryption` and master key).
  * `:replicas` - members of each shard's Raft group (default 3, at most the number of
    seeds). `replicas: 3` keeps every acknowledged write on a majority (2 of 3 nodes): one
    node can die or be cut off and its shards go on elsewhere within about a second.
    `replicas: 1` keeps one copy: nothing is replicated and a node's loss makes its shards
    unavailable (never lost: they come back with the node), the trade-off of a store that
    scales by adding nodes rather than by copying.
  * `:start_timeout` - ms `Kuma.start/1` waits for a majority of the seeds to form the
    cluster (default 60,000).
  * `:snapshot_every` - Raft log entries per shard between two snapshots (default 20,000).
    A snapshot is a copy of the shard file; Raft's log is truncated up to it, and a member
    that missed the truncated entries catches up from it.

  ## How it works (docs/cluster.md has the whole design)

  * A small Raft group of all seeds holds the cluster's identity: its id, the shard count,
    the replica count and the key of the keyed hashes of ids (every replica must find an
    entity under the same hash). A node started with other settings is refused with
    `{:cluster_mismatch, why}`.
  * Shard `i` is a Raft group (ra, RabbitMQ's Raft library) of `replicas` seeds, placed by
    `members/2`. Its leader owns it: the shard's entity processes run there only, and its
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

  Projections, read models and subscriptions (`{:error, {:not_supported_in_cluster,
  what}}`), master key rotation, and moving shards between nodes (seeds are fixed).
  Values about a subject (`Kuma.sensitive/3`) need the subject's key on the writing node.
  """

  @enforce_keys [:seeds, :replicas, :start_timeout, :system]
  defstruct [:seeds, :replicas, :start_timeout, :system, :id, :routes, snapshot_every: 20_000]

  @type t :: %__MODULE__{
          seeds: [node()],
          replicas: pos_integer(),
          start_timeout: pos_integer(),
          system: atom(),
          id: String.t() | nil,
          routes: :ets.tid() | nil,
          snapshot_every: pos_integer()
        }

  @doc false
  # Validates the `:cluster` option of `Kuma.start/1` (nil: single node).
  @spec validate(term(), atom()) :: {:ok, t() | nil} | {:error, term()}
  def validate(nil, _name), do: {:ok, nil}

  def validate(opts, name) when is_list(opts) do
    seeds = Keyword.get(opts, :seeds)
    replicas = Keyword.get(opts, :replicas, 3)
    timeout = Keyword.get(opts, :start_timeout, 60_000)
    snapshot_every = Keyword.get(opts, :snapshot_every, 20_000)

    cond do
      not Keyword.keyword?(opts) ->
        invalid("must be a keyword list")

      (unknown = Keyword.keys(opts) -- [:seeds, :replicas, :start_timeout, :snapshot_every]) != [] ->
        {:error, {:unknown_option, {:cluster, hd(unknown)}}}

      not (is_list(seeds) and seeds != [] and Enum.all?(seeds, &is_atom/1)) ->
        invalid(":seeds must be a non-empty list of node names")

      length(Enum.uniq(seeds)) != length(seeds) ->
        invalid(":seeds lists a node twice")

      not is_integer(replicas) or replicas < 1 or replicas > length(seeds) ->
        invalid(":replicas must be an integer from 1 to the number of seeds (#{length(seeds)})")

      not is_integer(timeout) or timeout < 1 ->
        invalid(":start_timeout must be a positive integer (ms)")

      not is_integer(snapshot_every) or snapshot_every < 1 ->
        invalid(":snapshot_every must be a positive integer (log entries)")

      node() == :nonode@nohost ->
        invalid("this VM is not a distributed node: start it with --sname or --name")

      node() not in seeds ->
        invalid("this node (#{node()}) is not among the seeds")

      true ->
        {:ok,
         %__MODULE__{
           seeds: Enum.sort(seeds),
           replicas: replicas,
           start_timeout: timeout,
           system: system(name),
           snapshot_every: snapshot_every
         }}
    end
  end

  def validate(_other, _name), do: invalid("must be a keyword list")

  defp invalid(why), do: {:error, {:invalid, :cluster, why}}

  @doc false
  # The ra system of a store: one per store and node, its files under <data_dir>/raft.
  def system(name), do: :"kuma_#{name}"

  @doc """
  The nodes holding shard `shard`'s replicas: `replicas` consecutive seeds (in sorted
  order) starting at `shard mod seeds`, so every node holds the same number of shards.
  """
  @spec members(t(), non_neg_integer()) :: [node()]
  def members(%__MODULE__{seeds: seeds, replicas: replicas}, shard) do
    n = length(seeds)
    for k <- 0..(replicas - 1), do: Enum.at(seeds, rem(shard + k, n))
  end

  @doc "The shards this node holds a replica of."
  @spec local_shards(t(), pos_integer()) :: [non_neg_integer()]
  def local_shards(%__MODULE__{} = c, shards), do: for(i <- 0..(shards - 1), node() in members(c, i), do: i)

  @doc false
  # The Raft group names of a store: its metadata group and each shard's group.
  def meta_group(%__MODULE__{system: system}), do: :"#{system}_meta"
  def shard_group(%__MODULE__{system: system}, shard), do: :"#{system}_shard_#{shard}"
end
