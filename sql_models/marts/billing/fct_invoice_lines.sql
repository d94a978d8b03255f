-- Invoice lines per customer and month: prorated base fees, usage, discount, risk adjustment, minimum top-up; integer minor units.
/* config
materialized: table
partitioned_by: billing_monthly
time_column: month
grain: [month, customer_id, line_number]
*/
with rated as (
    select * from fct_rated_usage_by_subscription_period
    where month >= $start_date::date and month < $end_date::date
),

periods as (
    select * from dim_subscription_periods_by_month
    where month >= $start_date::date and month < $end_date::date
),

-- a customer who joins, leaves or changes plan mid-month pays each period's fee for its days
base_fee_lines as (
    select
        customer_id,
        period_start,
        1 as sort_group,
        'base_fee' as line_type,
        null::varchar as meter_id,
        '' as dimension,
        plan_name || ' monthly base fee'
        || case when period_days < month_days
                then ' (' || period_days || ' of ' || month_days || ' days)'
            else ''
        end as description,
        from_nano(div_half_up(1000000000::hugeint * period_days, month_days)) as quantity,
        'month' as unit,
        base_fee as unit_price,
        null::decimal(38, 9) as included_quantity,
        null::decimal(38, 9) as billable_quantity,
        null::bigint as package_size,
        null::bigint as packages,
        null::varchar as tier_formula,
        div_half_up(to_nano(base_fee) * minor_per_major * period_days, 1000000000::hugeint * month_days)::bigint
            as amount_minor
    from periods
    where base_fee > 0
),

usage_lines as (
    select
        customer_id,
        period_start,
        2 as sort_group,
        'usage' as line_type,
        meter_id,
        dimension,
        price_description as description,
        quantity,
        unit,
        unit_price,
        included_quantity,
        billable_quantity,
        package_size,
        packages,
        tier_formula,
        amount_minor
    from rated
),

charges as (
    select
        customer_id,
        period_start,
        amount_minor
    from base_fee_lines
    union all
    select
        customer_id,
        period_start,
        amount_minor
    from usage_lines
),

subtotals as (
    select
        periods.customer_id,
        periods.period_start,
        coalesce(sum(charges.amount_minor), 0)::hugeint as subtotal_minor
    from periods
    left join charges
        on periods.customer_id = charges.customer_id
        and periods.period_start = charges.period_start
    group by periods.customer_id, periods.period_start
),

-- percentage discount on base fee + usage
discounted as (
    select
        periods.*,
        subtotals.subtotal_minor,
        -div_half_up(subtotals.subtotal_minor * to_nano(periods.discount_percent), 100 * 1000000000::hugeint)
            as discount_minor
    from periods
    inner join subtotals
        on periods.customer_id = subtotals.customer_id
        and periods.period_start = subtotals.period_start
),

-- seed 002: risk adjustment = (base fee + usage, after discount) x (risk multiplier - 1)
adjusted as (
    select
        *,
        div_half_up((subtotal_minor + discount_minor) * to_nano(risk_multiplier - 1), 1000000000)
            as risk_minor,
        div_half_up(to_nano(minimum_charge) * minor_per_major * period_days, 1000000000::hugeint * month_days)
            as minimum_minor
    from discounted
),

discount_lines as (
    select
        customer_id,
        period_start,
        3 as sort_group,
        'discount' as line_type,
        null::varchar as meter_id,
        '' as dimension,
        fmt_decimal(discount_percent) || '% discount on base fee and usage' as description,
        discount_percent as quantity,
        'percent' as unit,
        from_nano(subtotal_minor * 1000000000 // minor_per_major) as unit_price,
        null::decimal(38, 9) as included_quantity,
        null::decimal(38, 9) as billable_quantity,
        null::bigint as package_size,
        null::bigint as packages,
        null::varchar as tier_formula,
        discount_minor::bigint as amount_minor
    from adjusted
    where discount_percent > 0
),

risk_lines as (
    select
        customer_id,
        period_start,
        4 as sort_group,
        'risk_adjustment' as line_type,
        null::varchar as meter_id,
        '' as dimension,
        'Risk multiplier ' || fmt_decimal(risk_multiplier) || 'x on base fee and usage' as description,
        (risk_multiplier - 1)::decimal(38, 9) as quantity,
        'multiplier' as unit,
        from_nano((subtotal_minor + discount_minor) * 1000000000 // minor_per_major) as unit_price,
        null::decimal(38, 9) as included_quantity,
        null::decimal(38, 9) as billable_quantity,
        null::bigint as package_size,
        null::bigint as packages,
        null::varchar as tier_formula,
        risk_minor::bigint as amount_minor
    from adjusted
    where risk_multiplier <> 1
),

-- a minimum charge (prorated by days) tops the period up when its charges fall short
minimum_lines as (
    select
        customer_id,
        period_start,
        5 as sort_group,
        'minimum_charge' as line_type,
        null::varchar as meter_id,
        '' as dimension,
        'Top-up to the ' || fmt_decimal(from_nano(minimum_minor * 1000000000 // minor_per_major)) || ' minimum charge' as description,
        1::decimal(38, 9) as quantity,
        'minimum' as unit,
        from_nano(minimum_minor * 1000000000 // minor_per_major) as unit_price,
        null::decimal(38, 9) as included_quantity,
        null::decimal(38, 9) as billable_quantity,
        null::bigint as package_size,
        null::bigint as packages,
        null::varchar as tier_formula,
        (minimum_minor - (subtotal_minor + discount_minor + risk_minor))::bigint as amount_minor
    from adjusted
    where minimum_minor > subtotal_minor + discount_minor + risk_minor
),

all_lines as (
    select * from base_fee_lines
    union all by name
    select * from usage_lines
    union all by name
    select * from discount_lines
    union all by name
    select * from risk_lines
    union all by name
    select * from minimum_lines
),

invoice_plans as (
    select * from periods
    where is_invoice_plan
),

final as (
    select
        $start_date::date as month,
        all_lines.customer_id,
        row_number() over (
            partition by all_lines.customer_id
            order by all_lines.period_start, all_lines.sort_group, all_lines.meter_id, all_lines.dimension
        )::integer as line_number,
        invoice_plans.plan_id,
        invoice_plans.plan_version,
        invoice_plans.currency,
        line_periods.plan_id as line_plan_id,
        line_periods.plan_version as line_plan_version,
        all_lines.period_start,
        line_periods.period_end,
        all_lines.line_type,
        all_lines.meter_id,
        all_lines.dimension,
        all_lines.description,
        all_lines.quantity::decimal(38, 9) as quantity,
        all_lines.unit,
        all_lines.unit_price::decimal(38, 9) as unit_price,
        all_lines.included_quantity::decimal(38, 9) as included_quantity,
        all_lines.billable_quantity::decimal(38, 9) as billable_quantity,
        all_lines.package_size::bigint as package_size,
        all_lines.packages::bigint as packages,
        all_lines.tier_formula,
        all_lines.amount_minor::bigint as amount_minor
    from all_lines
    inner join invoice_plans
        on all_lines.customer_id = invoice_plans.customer_id
    inner join periods as line_periods
        on all_lines.customer_id = line_periods.customer_id
        and all_lines.period_start = line_periods.period_start
)

select * from final
