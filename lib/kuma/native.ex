defmodule Kuma.Native do
  @moduledoc false
  # Every NIF of kuma_nif, declared in one place (native/kuma_nif/src/lib.rs has the other
  # side). Nothing outside Kuma's own modules calls these. Conventions:
  #
  # * Functions returning `{:ok, value} | {:error, reason}` never raise for bad input; a Rust
  #   panic comes back as `{:error, {:panic, message}}`.
  # * `append*` return `{:ok, :ok}` once the request is queued; the commit is answered later
  #   with `{:kuma_reply, ref, result}` sent to the caller by the shard's writer thread.
  # * `*_dirty` and everything that touches disk run on dirty schedulers.

  @on_load :load_nif

  @doc false
  def load_nif do
    path = :filename.join(:code.priv_dir(:kuma), ~c"native/libkuma_nif")

    case :erlang.load_nif(path, 0) do
      :ok -> :ok
      {:error, {:reload, _}} -> :ok
      {:error, reason} -> {:error, {:kuma_nif_not_loaded, path, reason}}
    end
  end

  defp nif_missing, do: :erlang.nif_error(:kuma_nif_not_loaded)

  def store_open(_data_dir, _shards, _sync, _writer_threads, _master_key, _keystore_path), do: nif_missing()
  def store_encrypted(_store), do: nif_missing()
  def store_close(_store), do: nif_missing()
  def store_info(_store), do: nif_missing()
  def shard_for(_entity_id, _shards), do: nif_missing()
  def append(_store, _ref, _entity_id, _expected, _events), do: nif_missing()
  def append_dirty(_store, _ref, _entity_id, _expected, _events), do: nif_missing()
  def append_batch(_store, _ref, _entries), do: nif_missing()
  def append_batch_dirty(_store, _ref, _entries), do: nif_missing()
  def save_snapshot(_store, _ref, _entity_id, _seq, _version, _hash, _data), do: nif_missing()
  def save_snapshot_dirty(_store, _ref, _entity_id, _seq, _version, _hash, _data), do: nif_missing()
  def latest_snapshot(_store, _entity_id, _version, _max_seq), do: nif_missing()
  def seq_at(_store, _entity_id, _ts_us), do: nif_missing()
  def delete(_store, _ref, _entity_id), do: nif_missing()
  def seal_sensitive(_store, _subject_id, _plaintext), do: nif_missing()
  def unseal_sensitive(_store, _subject_id, _sealed), do: nif_missing()
  def rotate_master_key(_store, _new_key), do: nif_missing()
  def is_erased(_store, _entity_id), do: nif_missing()
  def snapshots(_store, _entity_id), do: nif_missing()
  def flush(_store), do: nif_missing()
  def read_entity(_store, _entity_id, _from_seq, _max), do: nif_missing()
  def read_shard(_store, _shard, _after, _max), do: nif_missing()
  def head(_store, _entity_id), do: nif_missing()
  def verify_entity(_store, _entity_id), do: nif_missing()
  def verify_shard(_store, _shard, _max_problems), do: nif_missing()
  def stats(_store), do: nif_missing()
  def query_shard(_store, _shard, _query, _max), do: nif_missing()
  def commit_positions(_store), do: nif_missing()
  def set_commit_listener(_store, _pid), do: nif_missing()
  def sqldb_open(_path), do: nif_missing()
  def sqldb_transaction(_db, _statements), do: nif_missing()
  def sqldb_query(_db, _sql, _params), do: nif_missing()
  def sqldb_truncate_wal(_db), do: nif_missing()
  def sqldb_close(_db), do: nif_missing()
  def fault_panic, do: nif_missing()
end
