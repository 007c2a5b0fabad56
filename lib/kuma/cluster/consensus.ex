defmodule Kuma.Cluster.Consensus do
  @moduledoc false
  # What Kuma needs of a consensus engine, and nothing more: the rest of Kuma reaches Raft
  # only through these calls, so the engine (ra today, `Kuma.Cluster.Consensus.Ra`) can be
  # upgraded or replaced without touching it. A group is a replicated state machine named
  # by an atom; its members are nodes, at most one member per node.
  #
  # ra 2.2.0 has no non-voting members: every member votes, so a member that is catching up
  # counts towards the quorum it cannot yet serve. A move therefore adds a member to a full
  # group (3 -> 4: the old three still make a quorum) and removes the old one only once the
  # new one has caught up (Kuma.Cluster.Rebalancer).

  @type group :: atom()
  @type machine :: {module(), map()}

  @doc "Makes the engine usable on this node, its files under `dir`."
  @callback start_system(system :: atom(), dir :: Path.t()) :: :ok | {:error, term()}

  @doc """
  Runs this node's member of `group` (recovered from its files, or new). Options:
  `:snapshot_interval` - log entries between two snapshots the engine takes when the
  machine allows one.
  """
  @callback ensure_member(system :: atom(), group(), machine(), members :: [node()], keyword()) ::
              :ok | {:error, term()}

  @doc "Stops this node's member of `group` (its files stay)."
  @callback stop_member(system :: atom(), group()) :: :ok

  @doc """
  Commits `command` in `group` and returns what the machine's apply answered on the
  leader. `via` is the member to ask first (ra follows redirects to the leader).
  """
  @callback command(group(), via :: node(), command :: term(), timeout()) ::
              {:ok, reply :: term(), leader :: node()} | {:timeout, node()} | {:error, term()}

  @doc "The node of `group`'s leader, asking member `via`."
  @callback leader(group(), via :: node(), timeout()) :: {:ok, node()} | {:error, term()}

  @doc """
  Asks this node's member of `group` to stand for election. A new group elects no leader
  on its own (ra waits for a first election), nor always does a group whose members all
  restarted: the caller triggers one when it finds none.
  """
  @callback trigger_election(group()) :: :ok

  @doc "The members of `group` and its leader, asking member `via`."
  @callback members(group(), via :: node(), timeout()) :: {:ok, [node()], leader :: node()} | {:error, term()}

  @doc """
  Adds `node` to `group` (asking `via`, redirected to the leader). Its member must be
  running already (`ensure_member/5` on that node, with the group's members and itself).
  """
  @callback add_member(group(), via :: node(), node(), timeout()) :: :ok | {:error, term()}

  @doc "Removes `node` from `group` (asking `via`). Its member stops taking part."
  @callback remove_member(group(), via :: node(), node(), timeout()) :: :ok | {:error, term()}

  @doc "Asks `group`'s leader, on `from`, to hand leadership to the member on `to`."
  @callback transfer_leadership(group(), from :: node(), to :: node()) :: :ok | {:error, term()}

  @doc "Stops this node's member of `group` and deletes its files (log and snapshots)."
  @callback delete_member(system :: atom(), group()) :: :ok | {:error, term()}

  @doc "The groups this node has a member of (running or not), by name."
  @callback local_groups(system :: atom()) :: [group()]

  @doc """
  This node's member of `group`, as the engine sees it: `%{role, term, commit_index,
  applied_index, snapshot_index}` (role: `:leader`, `:follower`, ...), or nil when it runs
  none.
  """
  @callback local_status(group()) :: map() | nil

  @doc """
  Confirms that this node's member of `group` still leads it in `term`: `:ok` once the
  member itself says it leads in `term` and a majority of the group's members (itself
  included) say their current term is no later than `term`, asked after this call began.
  No member of that majority can have voted for a newer leader before answering, and a
  newer leader needs the votes of a majority, which shares a member with this one: so no
  newer leader had acknowledged anything when this call began. `{:error, :not_leader}`
  otherwise, or when the answers do not come within `timeout`.
  """
  @callback confirm_leader(group(), term :: non_neg_integer(), timeout()) :: :ok | {:error, :not_leader}

  @doc """
  Starts pushing entries at or below `index` out of this node's files of `group` (an
  erasure was applied at `index`): the engine's write-ahead log starts a new file. Returns
  what `purged?/3` needs, including `upto`: the member's last written index now (a snapshot
  past it lets the engine drop the log files that hold `index`).
  """
  @callback purge_begin(system :: atom(), group()) :: %{upto: non_neg_integer()}

  @doc """
  Whether no file of this node's member of `group` holds an entry at or below `index`
  any more (`token` from `purge_begin/2`).
  """
  @callback purged?(system :: atom(), group(), index :: non_neg_integer(), token :: map()) :: boolean()

  @doc "Runs `{m, f, a}` (called with the machine's state first) on `group`'s leader."
  @callback query(group(), via :: node(), {module(), atom(), list()}, timeout()) :: {:ok, term()} | {:error, term()}

  @doc "Whether `node` runs its member of `group` now."
  @callback running?(group(), node()) :: boolean()

  @doc "Whether the engine's code is present: `:ok` or `{:error, why}`."
  @callback available() :: :ok | {:error, String.t()}

  @doc "The engine in use."
  @spec engine() :: module()
  def engine, do: Kuma.Cluster.Consensus.Ra
end
