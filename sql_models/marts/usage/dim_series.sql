-- Every raw series with its metric, labels, first sample, and the meter, customer and dimension it bills to.
/* config
materialized: view
*/
with series as (
    select * from stg_raw__series
),

meters as (
    select * from stg_seeds__meters
),

customers as (
    select * from stg_seeds__customers
),

series_catalogue as (
    select
        series_id,
        any_value(metric) as metric,
        any_value(labels) as labels,
        min(first_seen_ms) as first_seen_ms
    from series
    group by series_id
),

meter_metrics as (
    select
        meter_id,
        kind,
        unnest(metric_names) as metric,
        customer_label,
        dimension_label
    from meters
),

final as (
    select
        series_catalogue.series_id,
        series_catalogue.metric,
        series_catalogue.labels,
        series_catalogue.first_seen_ms,
        meter_metrics.meter_id,
        meter_metrics.kind,
        meter_metrics.customer_label,
        series_catalogue.labels[meter_metrics.customer_label] as customer_label_value,
        customers.customer_id,
        coalesce(series_catalogue.labels[meter_metrics.dimension_label], '') as dimension
    from series_catalogue
    left join meter_metrics
        on series_catalogue.metric = meter_metrics.metric
    left join customers
        on customers.label_value = series_catalogue.labels[meter_metrics.customer_label]
)

select * from final
