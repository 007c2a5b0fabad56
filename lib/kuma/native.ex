defmodule Kuma.Native do
  @moduledoc false
  # Every NIF of kuma_nif, declared in one place, with the shapes that cross the boundary
  # (native/kuma_nif/src has the other side, one file per domain). Nothing outside Kuma's
  # own modules calls these. Conventions:
  #
  # * Functions returning `{:ok, value} | {:error, reason}` never raise for bad input; a Rust
  #   panic comes back as `{:error, {:panic, message}}`. Reasons are `Kuma.Error`'s.
  # * `write_*` return `{:ok, :ok}` once the work is queued; the commit is answered later
  #   with `{:kuma_reply, ref, {:ok, value} | {:error, reason}}`, sent to the caller by the
  #   shard's writer thread. `*_dirty` twins take large inputs on a dirty CPU scheduler.
  # * `read_*`, `keys_*`, `sqldb_*` and anything else that touches disk run on dirty IO
  #   schedulers.

  require Record

  # A stored event, as `read_entity/4` and `read_query/5` return it (a record, because
  # catch-up reads return thousands per call; kuma_nif's term.rs says why).
  Record.defrecord(:event, :kuma_event, [
    :entity_id,
    :seq,
    :position,
    :shard,
    :timestamp,
    :type,
    :metadata,
    :payload,
    :hash
  ])

  # What a committed append reports (the value of a `write_append` reply).
  Record.defrecord(:appended, :kuma_appended, [
    :shard,
    :first_seq,
    :last_seq,
    :first_pos,
    :last_pos,
    :timestamp,
    :hash
  ])

  @type event :: record(:event)
  @type appended :: record(:appended)

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

  # store: open, close, facts (store.rs)
  def store_open(
        _data_dir,
        _shards,
        _sync,
        _writer_threads,
        _master_key,
        _keystore_path,
        _file_mode,
        _cluster_key,
        _tail,
        _global_order
      ),
      do: nif_missing()

  def store_close(_store), do: nif_missing()
  def store_global_position(_store), do: nif_missing()
  def store_follow_order(_store, _pid), do: nif_missing()
  def store_info(_store), do: nif_missing()
  def store_shard_for(_store, _entity_id), do: nif_missing()
  def store_stats(_store), do: nif_missing()
  def store_load(_store), do: nif_missing()

  # backups: segments of the store's files (backup.rs); all on dirty IO schedulers
  def backup_database(_src, _tmp, _segment, _label, _store_id, _mode, _shard?), do: nif_missing()
  def backup_frame_file(_src, _segment, _label, _store_id, _mode), do: nif_missing()
  def backup_read_segment(_segment, _label, _store_id, _dest_or_nil, _mode), do: nif_missing()
  def backup_summarize(_shard_path), do: nif_missing()
  def store_commit_positions(_store), do: nif_missing()
  def store_follow_commits(_store, _pid, _details), do: nif_missing()

  # write: queued to the shard's writer thread, answered later (write.rs)
  def write_append(_store, _ref, _entity_id, _expected, _events), do: nif_missing()
  def write_append_dirty(_store, _ref, _entity_id, _expected, _events), do: nif_missing()
  def write_batch(_store, _ref, _entries), do: nif_missing()
  def write_batch_dirty(_store, _ref, _entries), do: nif_missing()
  def write_snapshot(_store, _ref, _entity_id, _seq, _version, _hash, _data), do: nif_missing()
  def write_snapshot_dirty(_store, _ref, _entity_id, _seq, _version, _hash, _data), do: nif_missing()
  def write_delete_snapshots(_store, _ref, _entity_id, _version), do: nif_missing()
  def write_erase(_store, _ref, _entity_id), do: nif_missing()
  def write_flush(_store), do: nif_missing()
  def write_compact(_store, _ref, _shard), do: nif_missing()

  # cluster: preparing writes on a shard's leader, applying replicated ones (cluster.rs)
  def cluster_prepare(_store, _requests), do: nif_missing()
  def cluster_prepare_dirty(_store, _requests), do: nif_missing()
  def cluster_apply(_store, _shard, _raft_index, _commands, _reply_to, _ref, _watcher), do: nif_missing()
  def cluster_apply_dirty(_store, _shard, _raft_index, _commands, _reply_to, _ref, _watcher), do: nif_missing()
  def cluster_replica_reset(_store, _shard), do: nif_missing()
  def cluster_applied_index(_store, _shard), do: nif_missing()
  def cluster_snapshot_point(_store, _shard), do: nif_missing()
  def cluster_copy(_store, _shard, _path), do: nif_missing()
  def cluster_install(_store, _shard, _path), do: nif_missing()
  def cluster_release(_store, _shard), do: nif_missing()
  def cluster_copy_indexes(_path), do: nif_missing()
  def cluster_missing_keys(_store, _indexes), do: nif_missing()
  def cluster_export_keys(_store, _indexes), do: nif_missing()
  def cluster_install_keys(_store, _keys), do: nif_missing()
  def cluster_record_erased(_store, _indexes), do: nif_missing()

  # read (read.rs)
  def read_entity(_store, _entity_id, _from_seq, _max), do: nif_missing()
  def read_head(_store, _entity_id), do: nif_missing()
  def read_query(_store, _shard, _after, _query, _max), do: nif_missing()
  def read_position(_store, _shard, _position), do: nif_missing()
  def read_all(_store, _after, _max), do: nif_missing()
  def read_snapshot(_store, _entity_id, _version, _max_seq), do: nif_missing()
  def read_snapshots(_store, _entity_id), do: nif_missing()
  def read_seq_at(_store, _entity_id, _ts_us), do: nif_missing()
  def read_erased(_store, _entity_id), do: nif_missing()
  def read_erasure(_store, _entity_id), do: nif_missing()
  def read_verify_entity(_store, _entity_id), do: nif_missing()
  def read_verify_shard(_store, _shard, _max_problems), do: nif_missing()

  # keys (keys.rs)
  def keys_seal(_store, _subject_id, _plaintext), do: nif_missing()
  def keys_unseal(_store, _subject_id, _sealed), do: nif_missing()
  def keys_rotate(_store, _new_key), do: nif_missing()

  # read-model databases (sqldb.rs)
  def sqldb_open(_path, _file_mode), do: nif_missing()
  def sqldb_transaction(_db, _statements), do: nif_missing()
  def sqldb_query(_db, _sql, _params, _timeout_ms), do: nif_missing()
  def sqldb_truncate_wal(_db), do: nif_missing()
  def sqldb_close(_db), do: nif_missing()

  # test builds only (lib.rs)
  def fault_panic, do: nif_missing()
end
