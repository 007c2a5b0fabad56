defmodule Kuma.Store.Config do
  @moduledoc false
  # Validates `Kuma.start/1` options into a map. Unknown keys are refused so a typo
  # (`shard: 8`) is an error instead of a silently ignored option.

  @defaults %{name: :kuma, shards: 16, sync: :normal, decode: :trusted}
  @known [:name, :data_dir, :shards, :sync, :decode]

  def validate(opts) when is_list(opts) do
    with :ok <- check_keys(opts, @known),
         config = Map.merge(@defaults, Map.new(opts)),
         :ok <- check(:name, config.name),
         :ok <- check(:data_dir, Map.get(config, :data_dir)),
         :ok <- check(:shards, config.shards),
         :ok <- check(:sync, config.sync),
         :ok <- check(:decode, config.decode) do
      {:ok, %{config | data_dir: Path.expand(to_string(config.data_dir))}}
    end
  end

  def validate(_opts), do: {:error, {:invalid, :options, "must be a keyword list"}}

  @doc false
  # Shared by every function that takes options: unknown keys are errors, not ignored.
  def check_keys(opts, allowed) when is_list(opts) do
    case Enum.find(opts, fn item -> not (is_tuple(item) and tuple_size(item) == 2 and elem(item, 0) in allowed) end) do
      nil -> :ok
      {key, _} when is_atom(key) -> {:error, {:unknown_option, key}}
      other -> {:error, {:invalid, :options, "not a keyword pair: #{inspect(other)}"}}
    end
  end

  def check_keys(_opts, _allowed), do: {:error, {:invalid, :options, "must be a keyword list"}}

  defp check(:name, name) when is_atom(name) and name not in [nil, true, false], do: :ok
  defp check(:name, _), do: {:error, {:invalid, :name, "must be an atom"}}
  defp check(:data_dir, nil), do: {:error, {:invalid, :data_dir, "is required"}}
  defp check(:data_dir, dir) when is_binary(dir) and dir != "", do: :ok

  defp check(:data_dir, dir) when is_list(dir) and dir != [] do
    if List.ascii_printable?(dir) or :io_lib.printable_unicode_list(dir),
      do: :ok,
      else: {:error, {:invalid, :data_dir, "must be a path"}}
  end

  defp check(:data_dir, _), do: {:error, {:invalid, :data_dir, "must be a path"}}
  defp check(:shards, n) when is_integer(n) and n in 1..1024, do: :ok
  defp check(:shards, _), do: {:error, {:invalid, :shards, "must be an integer in 1..1024"}}
  defp check(:sync, s) when s in [:normal, :full], do: :ok
  defp check(:sync, _), do: {:error, {:invalid, :sync, "must be :normal or :full"}}
  defp check(:decode, d) when d in [:trusted, :safe], do: :ok
  defp check(:decode, _), do: {:error, {:invalid, :decode, "must be :trusted or :safe"}}
end
