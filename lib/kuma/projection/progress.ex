defmodule Kuma.Projection.Progress do
  @moduledoc false
  # A durable projection's own SQLite file, `<data_dir>/projections/<name>.sqlite`, and
  # every SQL statement Kuma runs on it: its identity (`_kuma_meta`), its checkpoint (per
  # shard a position and the chain hash of the event stored there, `_kuma_checkpoint`) and
  # its parked events (`_kuma_parked`). A read model's tables live in the same file, so its
  # rows and its checkpoint commit in one transaction (`save/3`).
  #
  # A checkpoint is a map of marks: `%{shard => {position, hash | nil}}`. The hash lets a
  # projection notice, when it starts, that a shard no longer holds what it read (a lost
  # WAL tail gave its positions out again) instead of skipping the events that took them.

  alias Kuma.Native

  @bookkeeping [
    "CREATE TABLE IF NOT EXISTS _kuma_meta (key TEXT PRIMARY KEY NOT NULL, value ANY) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS _kuma_checkpoint (shard INTEGER PRIMARY KEY, pos INTEGER NOT NULL, hash BLOB)",
    """
    CREATE TABLE IF NOT EXISTS _kuma_parked (
      shard INTEGER NOT NULL, pos INTEGER NOT NULL, entity_id BLOB NOT NULL, seq INTEGER NOT NULL,
      type TEXT NOT NULL, error TEXT NOT NULL, attempts INTEGER NOT NULL, parked_at INTEGER NOT NULL,
      PRIMARY KEY (shard, pos))
    """
  ]

  @type db :: reference()

  # Kuma's own queries on the file are small: this only bounds a file gone wrong.
  @query_timeout 5_000

  @doc """
  Opens (or creates) the file at `path` and checks that it belongs to this store and this
  projection: `identity` is a map of `_kuma_meta` keys to values, recorded on first open.
  """
  @spec open(Path.t(), %{String.t() => String.t()}, non_neg_integer()) :: {:ok, db()} | {:error, term()}
  def open(path, identity, file_mode) do
    with {:ok, db} <- Native.sqldb_open(path, file_mode) do
      case check_identity(db, path, identity) do
        :ok ->
          {:ok, db}

        error ->
          Native.sqldb_close(db)
          error
      end
    end
  end

  defp check_identity(db, path, identity) do
    with {:ok, _} <- Native.sqldb_transaction(db, Enum.map(@bookkeeping, &{&1, []})),
         :ok <- add_hash_column(db),
         {:ok, {_, rows}} <- Native.sqldb_query(db, "SELECT key, value FROM _kuma_meta", [], @query_timeout) do
      meta = Map.new(rows, fn [k, v] -> {k, v} end)

      case Enum.find(identity, fn {k, v} -> Map.has_key?(meta, k) and meta[k] != v end) do
        nil ->
          inserts = for {k, v} <- identity, do: {"INSERT OR IGNORE INTO _kuma_meta VALUES (?1, ?2)", [k, v]}
          with {:ok, _} <- Native.sqldb_transaction(db, inserts), do: :ok

        {key, value} ->
          {:error, {:foreign_projection, path, "#{key} is #{inspect(meta[key])}, expected #{inspect(value)}"}}
      end
    end
  end

  # Files written before checkpoints kept hashes get the column (their marks have none).
  defp add_hash_column(db) do
    with {:ok, {_, columns}} <-
           Native.sqldb_query(db, "SELECT name FROM pragma_table_info('_kuma_checkpoint')", [], @query_timeout) do
      if ["hash"] in columns do
        :ok
      else
        with {:ok, _} <- Native.sqldb_transaction(db, [{"ALTER TABLE _kuma_checkpoint ADD COLUMN hash BLOB", []}]),
             do: :ok
      end
    end
  end

  @doc "Closes the file."
  @spec close(db()) :: :ok
  def close(db) do
    Native.sqldb_close(db)
    :ok
  end

  @type marks :: %{non_neg_integer() => {non_neg_integer(), binary() | nil}}

  @doc "The stored checkpoint, as marks (shards never checkpointed are absent)."
  @spec checkpoint(db()) :: {:ok, marks()} | {:error, term()}
  def checkpoint(db) do
    with {:ok, {_, rows}} <- Native.sqldb_query(db, "SELECT shard, pos, hash FROM _kuma_checkpoint", [], @query_timeout) do
      {:ok, Map.new(rows, fn [shard, pos, hash] -> {shard, {pos, hash}} end)}
    end
  end

  @doc """
  Commits `statements` (a read model's rows) and the checkpoint `marks` (shard =>
  {position, hash}) in one transaction: all of it or none.
  """
  @spec save(db(), marks(), [{String.t(), list()}]) :: :ok | {:error, term()}
  def save(db, marks, statements \\ []) do
    upserts =
      for {shard, {pos, hash}} <- marks do
        {"INSERT INTO _kuma_checkpoint VALUES (?1, ?2, ?3) " <>
           "ON CONFLICT(shard) DO UPDATE SET pos = excluded.pos, hash = excluded.hash",
         [shard, pos, hash && {:blob, hash}]}
      end

    case Native.sqldb_transaction(db, statements ++ upserts) do
      {:ok, _} -> :ok
      error -> error
    end
  end

  @doc "Records a parked event and moves the checkpoint past it, in one transaction."
  @spec park(db(), map(), non_neg_integer()) :: :ok | {:error, term()}
  def park(db, parked, attempts) do
    row =
      {"INSERT OR REPLACE INTO _kuma_parked VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
       [
         parked.shard,
         parked.position,
         {:blob, parked.entity_id},
         parked.seq,
         parked.type,
         Kuma.Error.format(parked.error),
         attempts,
         System.os_time(:microsecond)
       ]}

    save(db, %{parked.shard => {parked.position, parked.hash}}, [row])
  end

  @doc "The parked events: shard, position, entity id, seq, type, error, attempts, when."
  @spec parked(db()) :: {:ok, [map()]} | {:error, term()}
  def parked(db) do
    sql =
      "SELECT shard, pos, entity_id, seq, type, error, attempts, parked_at FROM _kuma_parked ORDER BY parked_at, shard, pos"

    with {:ok, {_, rows}} <- Native.sqldb_query(db, sql, [], @query_timeout) do
      {:ok,
       Enum.map(rows, fn [shard, pos, id, seq, type, error, attempts, at] ->
         %{
           shard: shard,
           position: pos,
           entity_id: id,
           seq: seq,
           type: type,
           error: error,
           attempts: attempts,
           parked_at: at
         }
       end)}
    end
  end

  @doc "How many events are parked (0 if the file cannot be read)."
  @spec parked_count(db()) :: non_neg_integer()
  def parked_count(db) do
    case Native.sqldb_query(db, "SELECT count(*) FROM _kuma_parked", [], @query_timeout) do
      {:ok, {_, [[n]]}} -> n
      _ -> 0
    end
  end

  @doc """
  Forgets an erased entity: runs `statements` (a read model's deletions) and drops its
  parked records in one transaction, then truncates the WAL so no old page of them stays
  in `-wal`.
  """
  @spec forget(db(), binary(), [{String.t(), list()}]) :: :ok | {:error, term()}
  def forget(db, entity_id, statements) do
    parked = {"DELETE FROM _kuma_parked WHERE entity_id = ?1", [{:blob, entity_id}]}

    with {:ok, _} <- Native.sqldb_transaction(db, statements ++ [parked]),
         {:ok, _} <- Native.sqldb_truncate_wal(db) do
      :ok
    end
  end

  @doc "Drops the checkpoint and the parked events (a projection's rebuild)."
  @spec clear(db()) :: :ok | {:error, term()}
  def clear(db) do
    case Native.sqldb_transaction(db, [{"DELETE FROM _kuma_parked", []}, {"DELETE FROM _kuma_checkpoint", []}]) do
      {:ok, _} -> :ok
      error -> error
    end
  end

  @doc "Drops the checkpoint only (`checkpoint: :memory` projections start from zero)."
  @spec clear_checkpoint(db()) :: :ok | {:error, term()}
  def clear_checkpoint(db) do
    case Native.sqldb_transaction(db, [{"DELETE FROM _kuma_checkpoint", []}]) do
      {:ok, _} -> :ok
      error -> error
    end
  end

  @doc "A `_kuma_meta` value, or nil."
  @spec meta(db(), String.t()) :: {:ok, term()} | {:error, term()}
  def meta(db, key) do
    case Native.sqldb_query(db, "SELECT value FROM _kuma_meta WHERE key = ?1", [key], @query_timeout) do
      {:ok, {_, [[value]]}} -> {:ok, value}
      {:ok, {_, []}} -> {:ok, nil}
      error -> error
    end
  end

  @doc "Runs a read model's schema and records that it ran, in one transaction."
  @spec create_schema(db(), [String.t()]) :: :ok | {:error, term()}
  def create_schema(db, schema) do
    statements = Enum.map(schema, &{&1, []}) ++ [{"INSERT INTO _kuma_meta VALUES ('schema', 'created')", []}]

    case Native.sqldb_transaction(db, statements) do
      {:ok, _} -> :ok
      error -> error
    end
  end

  @doc "Removes a projection's file and its WAL and shared-memory files."
  @spec delete_files(Path.t()) :: :ok
  def delete_files(path) do
    for suffix <- ["", "-wal", "-shm"], do: File.rm(path <> suffix)
    :ok
  end
end
