defmodule Kuma.Store.ConfigTest do
  # Kuma.Store.Config: the one place options are validated and defaulted.
  use ExUnit.Case, async: true

  alias Kuma.Store.Config

  @key String.duplicate("ab", 32)

  test "defaults" do
    assert {:ok, c} = Config.validate(data_dir: "d", master_key: @key)
    assert c.name == :kuma and c.shards == 16 and c.sync == :normal and c.decode == :trusted
    assert c.snapshot_every == 100 and c.idle_timeout == :timer.minutes(15) and c.max_live_entities == 100_000
    assert c.data_dir == Path.expand("d") and c.keystore_path == nil and c.projection_specs == []
    assert c.projections_dir == Path.expand("d/projections") and c.file_mode == 0o600
    # Every store knows the latest-event aggregate and the sagas' log.
    assert c.aggregates == [Kuma.Aggregate.Latest, Kuma.Saga.Log]
    assert c.http == nil
    # The config holds a reference; the key itself waits in the vault.
    assert is_reference(c.master_key)
    assert Kuma.Keys.Vault.fetch(c.master_key) == {:ok, Base.decode16!(@key, case: :lower)}
  end

  test "every option is checked; unknown ones are refused" do
    bad = [
      {[], {:invalid, :data_dir, "is required"}},
      {[data_dir: ""], {:invalid, :data_dir, "must be a path"}},
      {[shards: 0], {:invalid, :shards, "must be an integer in 1..1024"}},
      {[shards: 1025], {:invalid, :shards, "must be an integer in 1..1024"}},
      {[sync: :always], {:invalid, :sync, "must be :normal or :full"}},
      {[decode: :yolo], {:invalid, :decode, "must be :trusted or :safe"}},
      {[name: "x"], {:invalid, :name, "must be an atom"}},
      {[snapshot_every: 0], {:invalid, :snapshot_every, "must be a positive integer or nil"}},
      {[idle_timeout: -1], {:invalid, :idle_timeout, "must be a positive integer (ms) or :infinity"}},
      {[max_live_entities: 0], {:invalid, :max_live_entities, "must be a positive integer or :infinity"}},
      {[writer_threads: 0], {:invalid, :writer_threads, "must be an integer in 1..1024 or nil"}},
      {[writer_threads: 1_000_000], {:invalid, :writer_threads, "must be an integer in 1..1024 or nil"}},
      {[tail_bytes: -1], {:invalid, :tail_bytes, "must be an integer in 0..2^40 (bytes)"}},
      {[tail_bytes: :big], {:invalid, :tail_bytes, "must be an integer in 0..2^40 (bytes)"}},
      {[data_dir: <<255, 254>>], {:invalid, :data_dir, "must be a UTF-8 path"}},
      {[keystore_path: <<255>>], {:invalid, :keystore_path, "must be a UTF-8 path"}},
      {[projections_dir: <<255>>], {:invalid, :projections_dir, "must be a UTF-8 path"}},
      {[projections_dir: :here], {:invalid, :projections_dir, "must be a path (a string)"}},
      {[file_mode: 0o044],
       {:invalid, :file_mode, "must be permissions such as 0o600 or 0o640, readable and writable by the owner"}},
      {[aggregates: [Enum]], {:invalid, :aggregates, "Enum lacks init/1"}},
      {[upcasters: [:nope]], {:invalid, :upcasters, "must be a list of 2-arity functions or modules with upcast/2"}},
      {[shard: 8], {:unknown_option, :shard}}
    ]

    for {opts, reason} <- bad do
      opts = Keyword.merge([data_dir: "d", master_key: @key], opts)
      opts = if reason == {:invalid, :data_dir, "is required"}, do: Keyword.delete(opts, :data_dir), else: opts
      assert Config.validate(opts) == {:error, reason}, inspect(opts)
    end

    assert {:error, {:invalid, :options, _}} = Config.validate(%{data_dir: "d"})
  end

  test "the master key: raw, hex or base64, from an option, a file or the environment" do
    raw = :crypto.strong_rand_bytes(32)

    for given <- [raw, Base.encode16(raw), Base.encode64(raw)] do
      assert {:ok, c} = Config.validate(data_dir: "d", master_key: given)
      assert Kuma.Keys.Vault.fetch(c.master_key) == {:ok, raw}
    end

    assert {:error, {:invalid, :master_key, _}} = Config.validate(data_dir: "d", master_key: "short")

    assert {:error, {:invalid, :master_key_file, "cannot read: " <> _}} =
             Config.validate(data_dir: "d", master_key_file: "/nonexistent/key")

    var = "KUMA_CONFIG_TEST_KEY_#{System.unique_integer([:positive])}"
    System.put_env(var, Base.encode16(raw))
    assert {:ok, c} = Config.validate(data_dir: "d", master_key_env: var)
    assert Kuma.Keys.Vault.fetch(c.master_key) == {:ok, raw}
    System.delete_env(var)
    assert {:error, {:missing_master_key, _}} = Config.validate(data_dir: "d", master_key_env: var)
    assert {:ok, %{master_key: nil}} = Config.validate(data_dir: "d", encryption: false)
  end

  test "projections configured with the store are validated into specs" do
    opts = [data_dir: "d", master_key: @key, name: :cfg]
    assert {:ok, %{projection_specs: [spec]}} = Config.validate(opts ++ [projections: [{Kuma.Test.Counter, name: :c}]])
    assert spec.kind == :read_model and spec.store == :cfg and spec.path == Path.expand("d/projections/c.sqlite")
    assert {:error, {:invalid, :projections, _}} = Config.validate(opts ++ [projections: :nope])
    assert {:error, {:invalid, :projections, _}} = Config.validate(opts ++ [projections: [{Kuma.Test.Counter, :x}]])
  end
end
