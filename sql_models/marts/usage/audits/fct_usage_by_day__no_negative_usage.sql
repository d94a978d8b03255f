-- Counter usage, gauge integrals and peaks are never negative.
/* audit
blocking: true
*/
with usage as (
    select * from fct_usage_by_day
),

final as (
    select
        day,
        customer_id,
        meter_id,
        dimension,
        usage,
        gauge_integral,
        gauge_peak
    from usage
    where usage < 0 or gauge_integral < 0 or gauge_peak < 0
)

select * from final
