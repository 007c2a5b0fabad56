defmodule Kuma.Snapshots do
  @moduledoc """
  Snapshots kept for a framework that runs its own aggregates (an event store adapter's
  `record_snapshot`, `read_snapshot`, `delete_snapshot`; see docs/frameworks.md). Kuma's
  own entities need none of this: they take snapshots by themselves (`snapshot_every:`).

  A snapshot is any term, saved as of a *version*: the entity's seq that the state
  reflects (1 up to the entity's last seq). Reading gives the latest one, or the latest at
  or before a version. Like Kuma's own snapshots they are sealed under the entity's key,
  go with it in `Kuma.export/2`, and are erased with it by `Kuma.delete/3` (crypto-
  shredded at once, the rows deleted with its events). Each snapshot records the chain
  hash of the event at its version, so one saved for events that were lost (a crash of a
  `sync: :normal` store) is not served: `read` answers `{:ok, nil}` for it.

  They are kept in the shard's snapshot table under a version number of their own (0;
  Kuma's own carry the aggregate's `snapshot_version/0`, at least 1). At most one snapshot
  is kept per entity and seq: a framework snapshot and one of a Kuma entity process at
  the same seq of the same entity replace each other. Both are only shortcuts over the
  events, so this can cost a longer load, never a wrong state.

  Cluster mode: the calls run on the shard's leader and the snapshot is kept in that
  node's copy of the shard, not replicated (like Kuma's own snapshots): after the
  leadership moves, `read` may answer `{:ok, nil}` and the framework replays the events.
  """

  alias Kuma.{Codec, EventLog, Native, Store, Validate}
  require Native

  # Kuma's own snapshots carry their aggregate's snapshot_version/0 (>= 1).
  @framework_version 0

  @typedoc "A snapshot as `read/3` gives it back."
  @type t :: %{version: pos_integer(), timestamp: integer(), data: term()}

  @doc """
  Saves `data` as the entity's state as of `version` (its seq then). Waits for the commit.
  Errors: `{:invalid, :version, _}` (not an integer in 1..the entity's last seq, or the
  entity has no events), `:erased`, `{:too_large, :snapshot, size, max}`.
  """
  @spec save(Store.t(), binary(), pos_integer(), term(), keyword()) :: :ok | {:error, term()}
  def save(%Store{} = s, entity_id, version, data, opts \\ []) do
    timeout = Keyword.get(opts, :timeout, EventLog.default_timeout())

    with :ok <- Validate.entity_id(entity_id),
         :ok <- check_version(version),
         {:ok, hash} <- hash_at(s, entity_id, version),
         {:ok, bytes} <- Codec.encode_term(data, s),
         {:ok, :ok} <- EventLog.save_snapshot(s, entity_id, version, @framework_version, hash, bytes, timeout) do
      :ok
    end
  end

  @doc """
  The entity's latest snapshot (option `:at_most`: the latest saved at or before that
  version): `{:ok, %{version: v, timestamp: us, data: term}}`, or `{:ok, nil}` if there is
  none (or the events it was taken after are no longer the entity's);
  `{:error, :entity_erased}` once the entity is erased.
  """
  @spec read(Store.t(), binary(), keyword()) :: {:ok, t() | nil} | {:error, term()}
  def read(%Store{} = s, entity_id, opts \\ []) do
    at_most = Keyword.get(opts, :at_most, :latest)

    with :ok <- Validate.entity_id(entity_id),
         :ok <- if(at_most == :latest, do: :ok, else: check_version(at_most, :at_most)),
         max_seq = if(at_most == :latest, do: 0xFFFFFFFFFFFFFFFF, else: at_most),
         {:ok, snap} <- Native.read_snapshot(s.native, entity_id, @framework_version, max_seq) do
      open(s, entity_id, snap)
    end
  end

  @doc "Deletes every snapshot saved with `save/5` for the entity. Waits for the commit."
  @spec delete(Store.t(), binary(), keyword()) :: :ok | {:error, term()}
  def delete(%Store{} = s, entity_id, opts \\ []) do
    timeout = Keyword.get(opts, :timeout, EventLog.default_timeout())

    with :ok <- Validate.entity_id(entity_id),
         {:ok, :ok} <- EventLog.delete_snapshots(s, entity_id, @framework_version, timeout) do
      :ok
    end
  end

  defp check_version(version, what \\ :version)
  defp check_version(version, _what) when is_integer(version) and version >= 1, do: :ok
  defp check_version(_version, what), do: {:error, {:invalid, what, "must be a positive integer (an entity's seq)"}}

  # The chain hash of the entity's event at `version`: what the snapshot is checked against.
  defp hash_at(s, entity_id, version) do
    case EventLog.head(s, entity_id) do
      {:ok, %{seq: seq, hash: hash}} when version == seq ->
        {:ok, hash}

      {:ok, %{seq: seq}} when version < seq ->
        case Native.read_entity(s.native, entity_id, version, 1) do
          {:ok, [Native.event(seq: ^version, hash: hash)]} -> {:ok, hash}
          {:ok, _} -> {:error, {:invalid, :version, "the entity has no event #{version}"}}
          error -> error
        end

      {:ok, %{seq: seq}} ->
        {:error, {:invalid, :version, "#{version} is past the entity's last seq (#{seq})"}}

      {:ok, nil} ->
        {:error, {:invalid, :version, "the entity has no events"}}

      error ->
        error
    end
  end

  # A snapshot is served only while the entity's event at its version is the one it was
  # saved after (same chain hash). None for an erased entity is its erasure.
  defp open(s, entity_id, nil) do
    with {:ok, _head} <- EventLog.head(s, entity_id), do: {:ok, nil}
  end

  defp open(s, entity_id, %{seq: seq, timestamp: ts, hash: hash, data: data}) do
    case Native.read_entity(s.native, entity_id, seq, 1) do
      {:ok, [Native.event(seq: ^seq, hash: ^hash)]} ->
        {:ok, %{version: seq, timestamp: ts, data: Codec.decode_stored(data, "", entity_id, seq, s, nil)}}

      {:ok, _} ->
        {:ok, nil}

      error ->
        error
    end
  end
end
