-- Raw Prometheus samples of the partition being computed, renamed and cast.
/* config
materialized: view
*/
with source as (
    select * from raw_samples
),

final as (
    select
        series_id::bigint as series_id,
        ts::bigint as ts_ms,
        value::double as value
    from source
)

select * from final
